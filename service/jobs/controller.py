"""The loop's conductor inside each serving process.

Every `jobs.apply_interval_s` it:
1. applies the stored serving state (student version, T_s, τ, π₀) when its revision moved,
   so a change made by a job, the CLI or another replica reaches this one without a restart;
2. follows the open rollout (loads the candidate, sets its stage in the engine) and writes
   the buffered candidate/incumbent pairs;
3. carries out the effect of finished jobs, once across replicas (new T_s, new τ, a
   candidate's rollout), and counts them;
4. every monitoring interval, evaluates the trigger rules over the stored metric windows
   (one replica at a time on PostgreSQL) and creates jobs;
5. judges the open rollout with the promotion gate, advancing, promoting or rolling back
   when configured to;
6. hands pending jobs to the runner.
Each step is isolated: a database outage or a failed step is logged and retried on the
next round, and the student keeps answering throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, func, select

from service.errors import ConflictError, KdguardError
from service.jobs import gate
from service.jobs.rules import decide, evidence_json
from service.jobs.runners import Runner
from service.monitoring.instruments import ROLLOUT_STAGES, Instruments, initialise_loop_series
from service.persistence import loop
from service.persistence.database import is_postgres
from service.registry import Manifest, ModelRegistry
from service.routing.deployment import Deployment
from service.routing.rollout import RolloutPlan
from service.settings import Settings, TriggerRule

log = logging.getLogger(__name__)

_TRIGGER_LOCK_KEY = 0x6B64_7472  # "kdtr": one replica evaluates triggers at a time
LABELLED_METRICS = frozenset({"accuracy_gap", "ece"})
T = TypeVar("T")


class Controller:
    def __init__(
        self,
        *,
        settings: Settings,
        database: Engine,
        deployment: Deployment,
        instruments: Instruments,
        runner: Runner | None,
    ) -> None:
        self._settings = settings
        self._db = database
        self._deployment = deployment
        self._m = instruments
        self._runner = runner
        self.model = deployment.name
        self._revision = 0
        self._last_triggers = -math.inf
        self._sync_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        initialise_loop_series(
            instruments, self.model, {r.name: r.action for r in settings.triggers.rules}
        )

    @property
    def database(self) -> Engine:
        return self._db

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Store this replica's start-up state unless one is stored, then follow it."""
        engine = self._deployment.engine
        student = engine.student
        await self._db_call(
            lambda c: loop.ensure_state(
                c, model=self.model, student_version=student.version,
                temperature=student.manifest.temperature,
                fallback_threshold=engine.fallback_threshold, shadow_rate=engine.shadow_rate,
            )
        )  # fmt: skip
        await self.sync()

    async def run(self) -> None:
        """Tick until `close`; a tick in progress is finished, never cut off mid-query."""
        interval = self._settings.jobs.apply_interval_s
        while not self._stopping.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    def stop(self) -> None:
        """Ask `run` to return after the tick in progress."""
        self._stopping.set()

    async def close(self) -> None:
        self._stopping.set()
        await self._step("flush pairs", self._flush_pairs)
        if self._runner is not None:
            await self._runner.close()

    async def tick(self) -> None:
        await self._step("sync", self.sync)
        await self._step("flush pairs", self._flush_pairs)
        await self._step("apply jobs", self._apply_finished)
        now = time.time()
        if now - self._last_triggers >= self._settings.monitoring.interval_s:
            self._last_triggers = now
            if self._settings.triggers.enabled:
                await self._step("triggers", self.evaluate_triggers)
        await self._step("gate", self.judge_rollout)
        await self._step("dispatch", self._dispatch)

    async def _step(self, what: str, step: Callable[[], Any]) -> None:
        try:
            await step()
        except Exception as exc:  # one failed step must not stop the loop
            log.warning("loop step %r failed: %s", what, exc)

    async def _db_call(self, work: Callable[[Connection], T]) -> T:
        def run() -> T:
            with self._db.begin() as connection:
                return work(connection)

        return await asyncio.to_thread(run)

    # -- 1, 2: follow the stored state -------------------------------------------------

    async def sync(self) -> None:
        async with self._sync_lock:
            state = await self._db_call(lambda c: loop.read_state(c, self.model))
            if state is not None and state.revision != self._revision:
                await self._apply_state(state)
            rollout = await self._db_call(lambda c: loop.open_rollout(c, self.model))
            await self._follow_rollout(rollout)

    async def _apply_state(self, state: loop.State) -> None:
        deployment, engine = self._deployment, self._deployment.engine
        if engine.student.version != state.student_version:
            try:
                await deployment.activate_student(state.student_version)
            except KdguardError as exc:
                log.error("cannot serve stored version %s: %s; keeping %s",
                          state.student_version, exc, engine.student.version)  # fmt: skip
        if engine.student.version == state.student_version:
            deployment.set_temperature(state.temperature)
        if (engine.fallback_threshold, engine.shadow_rate) != (
            state.fallback_threshold,
            state.shadow_rate,
        ):
            engine.set_routing(state.fallback_threshold, state.shadow_rate)
        self._revision = state.revision

    async def _follow_rollout(self, rollout: loop.RolloutRow | None) -> None:
        engine = self._deployment.engine
        plan = engine.rollout
        if rollout is None or rollout.incumbent_version != engine.student.version:
            if plan is not None:
                await self._flush_pairs()
                engine.set_rollout(None)
                self._rollout_gauges(plan.rollout_id, plan.candidate.version, None)
            return
        if plan is not None and plan.rollout_id == rollout.id and plan.stage == rollout.stage:
            return
        if plan is not None and plan.rollout_id == rollout.id:
            candidate = plan.candidate
        else:
            candidate = await self._deployment.load_candidate(rollout.candidate_version)
        settings = self._settings.rollout
        new = RolloutPlan(
            rollout_id=rollout.id, candidate=candidate,
            stage="ab" if rollout.stage == "ab" else "shadow",
            ab_share=rollout.config.get("ab_share", settings.ab_share),
            sample_rate=rollout.config.get("sample_rate", settings.sample_rate),
        )  # fmt: skip
        if plan is not None and plan.rollout_id == rollout.id:
            new.pairs = plan.pairs
        engine.set_rollout(new)
        self._rollout_gauges(rollout.id, rollout.candidate_version, rollout)
        log.info("rollout %s: %s in %s", rollout.id, candidate.version, rollout.stage)

    def _rollout_gauges(self, rollout_id: int, version: str, row: loop.RolloutRow | None) -> None:
        for stage in ROLLOUT_STAGES:
            current = row.stage if row is not None else None
            self._m.rollout_stage.labels(self.model, version, stage).set(
                1.0 if stage == current else 0.0
            )
        share = row.traffic_share if row is not None else 0.0
        self._m.rollout_traffic_share.labels(self.model, version).set(share)

    async def _flush_pairs(self) -> None:
        plan = self._deployment.engine.rollout
        if plan is None:
            return
        rows = plan.drain()
        if rows:
            await asyncio.to_thread(loop.insert_rollout_outputs, self._db, rows)

    # -- 3: carry out finished jobs ----------------------------------------------------

    async def _apply_finished(self) -> None:
        applied = await self._db_call(self._take_and_apply)
        for job in applied:
            self._m.jobs.labels(self.model, job.kind, job.status).inc()
            if job.duration_s is not None:
                self._m.job_duration.labels(self.model, job.kind, job.status).observe(
                    job.duration_s
                )
        if any(job.status == "succeeded" for job in applied):
            await self.sync()

    def _take_and_apply(self, connection: Connection) -> list[loop.JobRow]:
        jobs = loop.take_unapplied(connection, self.model)
        for job in jobs:
            if job.status != "succeeded" or job.result is None:
                continue
            try:
                with connection.begin_nested():
                    self._effect(connection, job, job.result)
            except ConflictError as exc:
                log.warning("job %s succeeded but its effect was skipped: %s", job.id, exc)
                loop.audit(connection, actor=f"job:{job.id}", action="job.effect_skipped",
                           model=self.model, subject=f"job {job.id}",
                           details={"reason": exc.message})  # fmt: skip
        return jobs

    def _effect(self, connection: Connection, job: loop.JobRow, result: dict[str, Any]) -> None:
        actor = f"job:{job.id}"
        if job.kind == "recalibrate" and result.get("accepted"):
            loop.change_state(
                connection, model=self.model, actor=actor, reason="temperature.recalibrated",
                expect_version=str(result["version"]), temperature=float(result["temperature"]),
            )  # fmt: skip
        elif job.kind == "retune_threshold":
            state = loop.read_state(connection, self.model)
            details = dict(state.details if state else {})
            details["threshold"] = {
                key: result.get(key)
                for key in ("mode", "budget", "epsilon", "delta", "expected_teacher_share",
                            "realised_teacher_share", "previous_fallback_threshold", "bound",
                            "n_pairs")
            } | {"job_id": job.id, "at": time.time()}  # fmt: skip
            loop.change_state(
                connection, model=self.model, actor=actor, reason="threshold.retuned",
                fallback_threshold=float(result["fallback_threshold"]), details=details,
            )  # fmt: skip
        elif job.kind == "redistill":
            incumbent = str(
                result.get("incumbent_version", self._deployment.engine.student.version)
            )
            loop.create_rollout(
                connection, model=self.model, candidate_version=str(result["candidate_version"]),
                incumbent_version=incumbent, config=self._rollout_config(), actor=actor,
                job_id=job.id,
            )  # fmt: skip

    def _rollout_config(self) -> dict[str, Any]:
        return self._settings.rollout.model_dump(mode="json")

    # -- 4: triggers -------------------------------------------------------------------

    def effective_rules(self, state: loop.State | None) -> list[TriggerRule]:
        """Configured rules with the overrides set through the admin API."""
        overrides: dict[str, dict[str, Any]] = (state.details if state else {}).get("rules", {})
        return [
            TriggerRule.model_validate({**rule.model_dump(), **overrides.get(rule.name, {})})
            for rule in self._settings.triggers.rules
        ]

    async def evaluate_triggers(self) -> list[dict[str, Any]]:
        fired = await self._db_call(self._evaluate_triggers)
        for firing in fired:
            self._m.trigger_firings.labels(self.model, firing["action"], firing["rule"]).inc()
            if firing["job_id"] is not None:
                self._m.jobs.labels(self.model, firing["action"], "pending").inc()
        if fired:
            await self._dispatch()
        return fired

    def _evaluate_triggers(self, connection: Connection) -> list[dict[str, Any]]:
        if (
            is_postgres(self._db)
            and not connection.execute(
                select(func.pg_try_advisory_xact_lock(_TRIGGER_LOCK_KEY))
            ).scalar()
        ):
            return []  # another replica is evaluating
        now = time.time()
        rules = self.effective_rules(loop.read_state(connection, self.model))
        last = loop.last_firings(connection, self.model)
        fired = []
        for rule in rules:
            metrics = {rule.metric, *rule.unless_alerting}
            windows = loop.recent_windows(
                connection, model=self.model, window=rule.window, metrics=metrics, limit=200
            )
            alerting = {
                metric: _newest_alert(windows.get(metric, []), metric)
                for metric in rule.unless_alerting
            }
            at, evidence = last.get(rule.name, (None, {}))
            decision = decide(
                rule, windows[rule.metric], now=now, last_fired_at=at,
                last_evidence_start=evidence.get("newest_window_start"), alerting=alerting,
            )  # fmt: skip
            if not decision.fire:
                continue
            evidence_row = evidence_json(rule, decision)
            job_id = None
            if rule.action != "alert_only":
                if loop.list_jobs(connection, model=self.model, status=loop.OPEN_JOB,
                                  kind=rule.action):  # fmt: skip
                    continue  # that action is already under way (maybe from another rule)
                if rule.action == "redistill" and loop.open_rollout(connection, self.model):
                    continue  # a candidate is already being judged
                try:
                    job = loop.create_job(
                        connection, model=self.model, kind=rule.action, rule=rule.name,
                        params=rule.params, evidence=evidence_row, actor=f"rule:{rule.name}",
                    )  # fmt: skip
                except ConflictError:
                    continue  # one open job per rule: this firing would add nothing
                job_id = job.id
            loop.record_firing(
                connection, model=self.model, rule=rule.name, metric=rule.metric,
                evidence=evidence_row, job_id=job_id, now=now,
            )  # fmt: skip
            log.info("rule %s fired (%s) → %s", rule.name, decision.why, job_id or "alert only")
            fired.append({"rule": rule.name, "action": rule.action, "job_id": job_id})
        return fired

    # -- 5: the promotion gate ---------------------------------------------------------

    async def judge_rollout(self) -> gate.Verdict | None:
        rollout = await self._db_call(lambda c: loop.open_rollout(c, self.model))
        if rollout is None:
            return None
        settings = self._settings.rollout.model_copy(update=rollout.config)
        verdict = await self._db_call(lambda c: gate.evaluate(c, rollout, self._settings.rollout))
        await self._db_call(lambda c: loop.save_gate_statistics(c, rollout.id, verdict.as_json()))
        for name, value in verdict.statistics.items():
            self._m.rollout_gate.labels(self.model, rollout.candidate_version, name).set(value)
        actor = "gate"
        try:
            if verdict.verdict == "fail" and settings.auto_rollback:
                await self.rollback(rollout.id, actor=actor, statistics=verdict.as_json())
            elif verdict.verdict == "pass" and rollout.stage == "shadow" and settings.auto_advance:
                await self.advance(rollout.id, actor=actor, statistics=verdict.as_json())
            elif verdict.verdict == "pass" and rollout.stage == "ab" and settings.auto_promote:
                await self.promote(rollout.id, actor=actor, statistics=verdict.as_json())
        except ConflictError as exc:
            log.info("gate decision on rollout %s lost a race: %s", rollout.id, exc)
        return verdict

    async def advance(
        self, rollout_id: int, *, actor: str, statistics: dict[str, Any] | None = None
    ) -> loop.RolloutRow:
        """shadow → A/B: the candidate starts serving its share of routing keys."""
        default_share = self._settings.rollout.ab_share

        def work(connection: Connection) -> loop.RolloutRow:
            return advance_rollout(connection, rollout_id, actor=actor,
                                   default_share=default_share, statistics=statistics)  # fmt: skip

        row = await self._db_call(work)
        await self.sync()
        return row

    async def promote(
        self, rollout_id: int, *, actor: str, statistics: dict[str, Any] | None = None
    ) -> loop.RolloutRow:
        """The candidate becomes the serving student, everywhere; exactly one caller wins.

        The candidate is validated again first: its files may have changed on disk since
        its rollout loaded it, and a promotion no worker could serve must not be stored.
        """
        registry = self._deployment.registry
        current = await self._db_call(lambda c: loop.get_rollout(c, rollout_id))
        if current.open:  # a closed one is refused below, as a conflict
            await self._deployment.load_candidate(current.candidate_version)

        def work(connection: Connection) -> loop.RolloutRow:
            return promote_rollout(connection, registry, rollout_id, actor=actor,
                                   statistics=statistics)  # fmt: skip

        row = await self._db_call(work)
        self._m.rollout_decisions.labels(self.model, "promoted").inc()
        await self.sync()
        self._rollout_gauges(row.id, row.candidate_version, row)
        return row

    async def rollback(
        self, rollout_id: int, *, actor: str, statistics: dict[str, Any] | None = None
    ) -> loop.RolloutRow:
        """The candidate leaves traffic; the incumbent (which never stopped) serves all."""
        row = await self._db_call(
            lambda c: rollback_rollout(c, rollout_id, actor=actor, statistics=statistics)
        )
        self._m.rollout_decisions.labels(self.model, "rolled_back").inc()
        await self.sync()
        self._rollout_gauges(row.id, row.candidate_version, row)
        return row

    async def start_rollout(self, candidate_version: str, *, actor: str) -> loop.RolloutRow:
        """Put a registered candidate in shadow (validated before anything is stored)."""
        await self._deployment.load_candidate(candidate_version)
        incumbent = self._deployment.engine.student.version
        if candidate_version == incumbent:
            raise ConflictError(f"version {candidate_version} is already serving")
        row = await self._db_call(
            lambda c: loop.create_rollout(
                c, model=self.model, candidate_version=candidate_version,
                incumbent_version=incumbent, config=self._rollout_config(), actor=actor,
            )
        )  # fmt: skip
        await self.sync()
        return row

    async def activate(self, version: str, *, actor: str) -> Manifest:
        """Activate a version by hand: validated and swapped here, then stored for all."""
        async with self._sync_lock:  # no sync may revert it between the swap and the store
            manifest = await self._deployment.activate_student(version)
            await self._db_call(
                lambda c: loop.change_state(
                    c, model=self.model, actor=actor, reason="student.activated",
                    student_version=version, temperature=manifest.temperature,
                )
            )  # fmt: skip
        await self.sync()
        return manifest

    async def set_routing(
        self, fallback_threshold: float, shadow_rate: float, *, actor: str
    ) -> None:
        await self._db_call(
            lambda c: loop.change_state(
                c, model=self.model, actor=actor, reason="routing.updated",
                fallback_threshold=fallback_threshold, shadow_rate=shadow_rate,
            )
        )  # fmt: skip
        await self.sync()

    # -- 6: hand jobs to the runner ----------------------------------------------------

    async def _dispatch(self) -> None:
        if self._runner is None:
            return
        stale_before = time.time() - self._settings.jobs.timeout_s - 60.0
        await self._db_call(lambda c: loop.fail_stale_jobs(c, older_than=stale_before))
        pending = await self._db_call(
            lambda c: loop.list_jobs(c, model=self.model, status=["pending"])
        )
        for job in sorted(pending, key=lambda j: j.id):
            if job.runner is None or job.runner == self._runner.name:
                await self._runner.submit(job)

    async def trigger_job(self, kind: str, params: dict[str, Any], *, actor: str) -> loop.JobRow:
        """A manual job (admin API, CLI): the same record and path as a rule's."""
        job = await self._db_call(
            lambda c: loop.create_job(
                c, model=self.model, kind=kind, rule=f"manual:{kind}", params=params,
                evidence={"manual": True, "actor": actor}, actor=actor,
            )
        )  # fmt: skip
        self._m.jobs.labels(self.model, kind, "pending").inc()
        await self._dispatch()
        return job


def advance_rollout(
    connection: Connection,
    rollout_id: int,
    *,
    actor: str,
    default_share: float,
    statistics: dict[str, Any] | None = None,
) -> loop.RolloutRow:
    """shadow → A/B, in the database (the controller and the CLI share it)."""
    current = loop.get_rollout(connection, rollout_id)
    share = float(current.config.get("ab_share", default_share))
    return loop.move_rollout(
        connection, rollout_id, from_stages=["shadow"], to_stage="ab", actor=actor,
        traffic_share=share, statistics=statistics,
    )  # fmt: skip


def promote_rollout(
    connection: Connection,
    registry: ModelRegistry,
    rollout_id: int,
    *,
    actor: str,
    statistics: dict[str, Any] | None = None,
) -> loop.RolloutRow:
    """The rollout's candidate becomes the stored serving version: one transaction."""
    row = loop.move_rollout(
        connection, rollout_id, from_stages=["shadow", "ab"], to_stage="promoted",
        actor=actor, traffic_share=1.0, statistics=statistics, decision="promoted",
    )  # fmt: skip
    manifest = registry.manifest(row.model, row.candidate_version)
    loop.change_state(
        connection, model=row.model, actor=actor, reason="rollout.promoted",
        student_version=row.candidate_version, temperature=manifest.temperature,
    )  # fmt: skip
    return row


def rollback_rollout(
    connection: Connection,
    rollout_id: int,
    *,
    actor: str,
    statistics: dict[str, Any] | None = None,
) -> loop.RolloutRow:
    return loop.move_rollout(
        connection, rollout_id, from_stages=["shadow", "ab"], to_stage="rolled_back",
        actor=actor, traffic_share=0.0, statistics=statistics, decision="rolled_back",
    )  # fmt: skip


def _newest_alert(windows: list[dict[str, Any]], metric: str) -> bool:
    """Is the metric's newest window (newest matured one, for labelled metrics) in alert?"""
    for window in windows:  # newest first
        if metric in LABELLED_METRICS and not window["matured"]:
            continue
        return bool(window["state"] == "alert")
    return False
