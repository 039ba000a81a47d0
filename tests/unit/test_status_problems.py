"""What deploys leave wrong becomes one problem line each, saying what and where."""

from __future__ import annotations

from esb.config import Definitions, HttpChannelDef, JobDef
from esb.deploy.generations import DeployFacts, WorkerGeneration
from esb.odb import RejectedDeployment
from esb.status.collect import GENERATION_GRACE_S, deploy_problems, service_problems


def worker(pid: int, services: list[str] | None, alive: bool = True) -> dict:
    return {"host": "h", "pid": pid, "alive": alive, "services": services}


def definitions() -> Definitions:
    objects = {
        "channel.http": {"c": HttpChannelDef(name="c", path="/c", service="s.one")},
        "scheduler.job": {"j": JobDef(name="j", service="s.two", type="interval", seconds=1)},
    }
    unit_of = {("channel.http", "c"): "u.toml", ("scheduler.job", "j"): "u.toml"}
    return Definitions(objects=objects, unit_of=unit_of)


def test_service_loaded_nowhere_or_somewhere():
    problems = service_problems(definitions(), [worker(1, ["s.one"]), worker(2, [])])
    assert problems == [
        "channel.http c (u.toml) names service s.one, which worker h:2 did not load",
        "scheduler.job j (u.toml) names service s.two, which is not deployed",
    ]


def test_services_of_dead_or_silent_workers_do_not_count():
    assert service_problems(definitions(), [worker(1, None), worker(2, [], alive=False)]) == []
    assert service_problems(definitions(), [worker(1, ["s.one", "s.two"])]) == []


def facts(*workers: WorkerGeneration, generation: int = 7) -> DeployFacts:
    return DeployFacts(generation=generation, last_good=6, rejected=[], workers=list(workers))


def test_worker_on_another_generation_past_the_grace():
    behind = WorkerGeneration("h", 1, 6, None)
    assert deploy_problems(facts(behind), 1.0, []) == []
    assert deploy_problems(facts(behind), GENERATION_GRACE_S + 1, []) == [
        "worker h:1 serves generation 6, the ODB is at generation 7"
    ]
    assert deploy_problems(facts(WorkerGeneration("h", 2, 7, None)), 100.0, []) == []


def test_generation_a_worker_could_not_apply_and_rollbacks():
    failed = WorkerGeneration("h", 1, 6, "generation 7: u.toml: channel.http.x.path: bad")
    rejected = RejectedDeployment(9, "module", "m", 2, "2 workers died while importing it (m.py)", 9, 6,
                                  "2026-01-01T00:00:00Z")
    assert deploy_problems(facts(failed), 0.0, [rejected]) == [
        "worker h:1 could not apply generation 7: u.toml: channel.http.x.path: bad; it serves generation 6",
        "module m version 2 was rejected at 2026-01-01T00:00:00Z: 2 workers died while importing it (m.py); "
        "deploy a fixed version or undeploy it",
    ]
