"""Indices of series by study and by last image: every worker's poll asks, for each queued job, whether another
series of its study is still arriving (``node.db.jobs.study_settling``), and ``lungnode status`` (run every
minute by the metrics timer) lists the newest series. Without them both read the whole series table: on a ledger
of 300,000 series a claim took 1.6 s on SQLite, holding the write lock the receiver needs (100 ms on PostgreSQL).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 01:00:00

"""
from typing import Sequence, Union

from alembic import op

revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_series_study', 'series', ['study_id'], unique=False)
    op.create_index('ix_series_last_received', 'series', ['last_received_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_series_last_received', table_name='series')
    op.drop_index('ix_series_study', table_name='series')
