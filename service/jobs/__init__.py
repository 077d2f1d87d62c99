"""The closed loop's actions: trigger rules, job records, runners and job bodies.

A job body is a plain function `(JobContext) -> dict` (see `context.py`). It reads what it
needs from the database and the registry, reports progress, and returns a JSON-able
result. It never touches a running server: the runner stores the result and applies its
effect (a new temperature, a new τ, a candidate's rollout) in the transaction that marks
the job succeeded, and every serving replica picks the change up from the database.
"""
