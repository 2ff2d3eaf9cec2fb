"""Outbox rows remember when their last error happened: ``status`` dated it by the row's last change, so an old
error showed the time of a later attempt (or of an operator's requeue).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 22:20:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('outbox', sa.Column('last_error_at', sa.DateTime(), nullable=True))
    # The best date there is for the errors already recorded.
    op.execute("UPDATE outbox SET last_error_at = updated_at WHERE last_error IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table('outbox') as batch:
        batch.drop_column('last_error_at')
