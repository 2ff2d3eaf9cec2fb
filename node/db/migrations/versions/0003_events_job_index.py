"""Index of events by job and kind: the retention pass asks, per job of a purged series, whether its results
were deleted already (a results_purged event), and the events table grows with every image.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 09:20:00

"""
from typing import Sequence, Union

from alembic import op

revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_events_job_kind', 'events', ['job_id', 'kind'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_events_job_kind', table_name='events')
