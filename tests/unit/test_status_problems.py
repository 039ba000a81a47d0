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


def test_readiness_counts_live_ready_workers_of_this_server(tmp_path):
    import socket

    from esb.config import load_server_config
    from esb.status.readiness import readiness_problems

    (tmp_path / "server.conf").write_text("[main]\nworkers = 2\n[admin]\nusername = a\npassword = b\n")
    config = load_server_config(tmp_path)
    here = {"host": socket.gethostname(), "server": str(config.directory), "alive": True, "generation": 3,
            "build_error": None, "left_out_units": []}
    ready = here | {"pid": 1, "ready": True}
    assert readiness_problems([ready, ready | {"pid": 2}], config) == []
    building = here | {"pid": 2, "ready": False, "build_error": "FileExistsError: run/loading"}
    problems = readiness_problems([ready, building], config)
    assert any(":2 is not ready" in p and "FileExistsError" in p for p in problems), problems
    assert any("1 of the 2 workers" in p for p in problems), problems
    left_out = ready | {"pid": 2, "left_out_units": ["partner.toml: x: environment variable K is not set"]}
    problems = readiness_problems([ready, left_out], config)
    assert any("without unit partner.toml" in p and " K " in p for p in problems), problems


def test_units_that_do_not_resolve_are_left_out_alone():
    from esb.deploy.stored import merge_what_resolves

    secured = '[[security.api_key]]\nname = "k"\nheader = "X-K"\nvalue = "$ENV{UNSET_HERE_XYZ}"\n'
    uses = '[[channel.http]]\nname = "s"\npath = "/s"\nservice = "x.s"\nsecurity = "k"\n'
    plain = '[[channel.http]]\nname = "p"\npath = "/p"\nservice = "x.p"\n'
    definitions, left_out = merge_what_resolves(
        [("a-secured.toml", secured), ("b-uses.toml", uses), ("c-plain.toml", plain)], environ={}
    )
    assert set(definitions.channels) == {"p"}
    assert [e.file for e in left_out] == ["a-secured.toml", "b-uses.toml"]
    assert "UNSET_HERE_XYZ" in str(left_out[0])
