"""Instances remember that retention deleted their file: a series the PACS sends again after retention is stored
and analysed again, and only the instances that came back are read.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 15:20:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('instances', sa.Column('purged_at', sa.DateTime(), nullable=True))
    # Until now only the series said so: its instances' files went with it.
    op.execute("UPDATE instances SET purged_at = (SELECT series.purged_at FROM series WHERE series.id = "
               "instances.series_id) WHERE series_id IN (SELECT id FROM series WHERE purged_at IS NOT NULL)")


def downgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.drop_column('purged_at')
