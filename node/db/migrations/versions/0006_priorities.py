"""Series have a priority: the C-STORE Priority each association brought, and each job's level (high 1, medium 0,
low -1), which orders the queue.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 18:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column('associations', sa.Column('priority', sa.Integer(), nullable=True))
    op.add_column('jobs', sa.Column('priority', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('priority')
    with op.batch_alter_table('associations') as batch:
        batch.drop_column('priority')
