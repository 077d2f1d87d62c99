"""Entry point of a job's child process: `python -m service.jobs.child JOB_ID`.

Reads the parent's settings (JSON) from stdin, so the child sees exactly the
configuration of the server that started it, secrets included, without them ever being
written to disk or the command line. The parent already claimed the job.
"""

from __future__ import annotations

import logging
import sys

from service.jobs.execute import execute_job
from service.settings import Settings


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s job %(levelname)s %(message)s")
    job_id = int(argv[1])
    settings = Settings.model_validate_json(sys.stdin.read())
    job = execute_job(settings, job_id, runner="process", claimed=True)
    logging.getLogger(__name__).info("job %s %s", job_id, job.status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
