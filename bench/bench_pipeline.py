"""A 6-job GitLab pipeline: `kata-ci run --pipeline` (each job in its own VM) against the
same job scripts run directly on the host, in one run.

Run: .venv/bin/python bench/bench_pipeline.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kata_ci.runner.gitlab.ci_file import load
from kata_ci.runner.gitlab.jobs import job_script, predefined_variables

PIPELINE = """\
stages: [build, test, deploy]
build: {stage: build, script: ['printf "int main(void){return 0;}" > m.c', 'cc -O2 -o m m.c']}
unit: {stage: test, script: ['./m', 'seq 1 20000 | sort -n | tail -1']}
lint: {stage: test, script: ['grep -c main m.c']}
docs: {stage: test, script: ['python3 -c "print(sum(range(10**6)))"']}
package: {stage: test, script: ['tar czf m.tgz m m.c']}
deploy: {stage: deploy, script: ['ls -l m.tgz']}
"""
KATA_CI = [sys.executable, "-m", "kata_ci.runner.cli"]


def main() -> None:
    project = Path(tempfile.mkdtemp(prefix="kci-bp-"))
    (project / ".gitlab-ci.yml").write_text(PIPELINE)
    jobs = load(project / ".gitlab-ci.yml", project, predefined_variables(project)).jobs
    env = {**os.environ, "KATA_CI_RUN_DIR": str(project / ".run")}
    started = time.perf_counter()
    for job in jobs:  # stage order = file order here
        subprocess.run(["bash", "-c", job_script(job.script, echo=False)], cwd=project,
                       check=True, capture_output=True)
    host = time.perf_counter() - started
    rows = [("same scripts directly on the host (bash)", host)]
    for parallel in (1, 2):
        started = time.perf_counter()
        result = subprocess.run([*KATA_CI, "run", "--pipeline", "-j", str(parallel)],
                                cwd=project, env=env, capture_output=True)
        if result.returncode != 0:
            raise SystemExit(result.stderr.decode())
        rows.append((f"kata-ci run --pipeline -j {parallel} (6 VMs)",
                     time.perf_counter() - started))
    print("6-job pipeline (build; 4 test jobs; deploy), one run\n")
    for name, secs in rows:
        print(f"{name:<42} {secs:7.2f} s  {secs / host:7.1f}x host")


if __name__ == "__main__":
    main()
