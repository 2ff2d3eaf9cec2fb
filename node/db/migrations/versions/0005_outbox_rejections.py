"""Outbox rows remember their object's series and the rejection note that withdrew them: results a later analysis
replaced can be withdrawn from the destinations that received them (IHE IOCM rejection note), once.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 18:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('outbox', sa.Column('series_instance_uid', sa.String(length=64), nullable=True))
    op.add_column('outbox', sa.Column('rejected_by', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('outbox') as batch:
        batch.drop_column('rejected_by')
        batch.drop_column('series_instance_uid')
