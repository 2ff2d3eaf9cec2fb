"""Index of events by kind: ``lungnode status`` (every minute from the metrics timer) asks for the latest
analysis_disabled or analysis_enabled event, which without it reads the whole events table, one that grows with
every association and job.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 02:00:00

"""
from typing import Sequence, Union

from alembic import op

revision: str = '0009'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_events_kind', 'events', ['kind', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_events_kind', table_name='events')
