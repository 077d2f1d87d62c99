"""Reading stored metric windows back (the summary endpoint, every replica alike)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.persistence.tables import MetricWindow

W = MetricWindow


def latest_windows(
    session: Session, *, model: str, window: str, labelled: frozenset[str]
) -> list[MetricWindow]:
    """Each metric's row from the newest window; labelled metrics from the newest matured one."""
    newest = session.execute(
        select(func.max(W.window_start)).where(W.model == model, W.window == window)
    ).scalar()
    if newest is None:
        return []
    rows = list(
        session.execute(
            select(W).where(W.model == model, W.window == window, W.window_start == newest)
        ).scalars()
    )
    out = [r for r in rows if r.metric not in labelled]
    for metric in sorted(labelled):
        matured = session.execute(
            select(W)
            .where(W.model == model, W.window == window, W.metric == metric, W.matured.is_(True))
            .order_by(W.window_start.desc())
            .limit(1)
        ).scalar_one_or_none()
        chosen = matured or next((r for r in rows if r.metric == metric), None)
        if chosen is not None:
            out.append(chosen)
    return out
