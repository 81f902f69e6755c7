"""W&B logging without a usable server: fall back instead of crashing, keep frep-eval on the training run's
identity, find `wandb login`'s key for the client's own default server, no run id for a disabled run.
WANDB_MODE, WANDB_DIR and WANDB_CACHE_DIR come from conftest.py's autouse fixture (offline, a temporary dir)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from omegaconf import OmegaConf

from frep_lightning import sweep

PROXY_VARS = (
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"
)  # fmt: skip


class _Refusing(http.server.BaseHTTPRequestHandler):
    """What a proxy or firewall that takes the connection but is no W&B server answers: 404 to everything."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_wandb(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A server that accepts TCP connections (so the reachability probe says online) and answers 404."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for key in PROXY_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "20")
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_guessed_online_mode_falls_back_to_offline_when_the_run_cannot_start(
    not_wandb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A key and a port that takes connections is not a W&B server: the job logs offline instead of dying in
    wandb.init (~100 s of retries through such a proxy, then CommError, before any training)."""
    monkeypatch.delenv("WANDB_MODE")
    loggers = sweep.wandb_logger(str(tmp_path), project="test", name="run")
    assert loggers[1]._wandb_init["mode"] == "online"  # the probe's guess
    trainer = SimpleNamespace(loggers=loggers, is_global_zero=True)
    with caplog.at_level("WARNING", logger="frep_lightning"):
        sweep.start_wandb(trainer, OmegaConf.create({"seed": 0}))
    run = loggers[1].experiment
    try:
        assert run.settings.mode == "offline" and run.config["config"] == {"seed": 0}
        assert "could not start online" in caplog.text and "wandb sync" in caplog.text
        assert sweep.wandb_run_id(trainer) == run.id
    finally:
        run.finish()
    assert list(tmp_path.glob(f"wandb/offline-run-*-{run.id}"))


def test_only_a_guessed_online_mode_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WANDB_MODE=online or logger.mode=online is the user's choice: W&B's own error stands."""
    monkeypatch.setenv("WANDB_MODE", "online")
    assert not sweep.wandb_logger(str(tmp_path), csv=False)._frep_offline_fallback
    monkeypatch.delenv("WANDB_MODE")
    assert not sweep.wandb_logger(str(tmp_path), mode="online", csv=False)._frep_offline_fallback


def test_frep_eval_resumes_the_training_run_under_its_own_name_and_project(tmp_path: Path) -> None:
    """`frep-eval logger=wandb` must not rename the training run to eval.yaml's run_name (frep-eval), nor
    take it (by id) to logger=wandb's default project when the run logged to another one."""
    from frep_lightning.eval import make_loggers

    chosen = {"_target_": "frep_lightning.sweep.wandb_logger", "project": "frep-lightning", "name": "frep-eval",
              "group": None, "mode": "offline", "tags": [], "csv": False}  # fmt: skip
    own = dict(chosen, project="mine", name="frep-resnet18-cifar10-s0.9", group="table2-x", entity="lab")
    made = make_loggers(OmegaConf.create({"logger": chosen}), OmegaConf.create({"logger": own}), tmp_path, "abc123")
    init = made[0]._wandb_init
    assert (init["id"], init["resume"]) == ("abc123", "allow")
    assert (init["name"], init["project"], init["group"], init["entity"]) == (
        "frep-resnet18-cifar10-s0.9", "mine", "table2-x", "lab"
    )  # fmt: skip
    # no run config: the run keeps whatever name it has (None: not renamed on resume)
    made = make_loggers(OmegaConf.create({"logger": chosen}), None, tmp_path, "abc123")
    assert made[0]._wandb_init["name"] is None
    # a new run (no training run id) keeps eval's own name
    made = make_loggers(OmegaConf.create({"logger": chosen}), OmegaConf.create({"logger": own}), tmp_path, None)
    assert made[0]._wandb_init["name"] == "frep-eval"


def test_wandb_login_key_for_the_clients_default_server_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`wandb login` writes the key under the installed client's default server (api.forge.coreweave.com from
    wandb 0.31): logger=auto must see it, and the probe must try the server the client talks to."""
    from wandb.sdk.lib.urls import DEFAULT_BASE_URL

    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", *PROXY_VARS):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not sweep.wandb_key_present()
    host = urlsplit(DEFAULT_BASE_URL).netloc
    netrc.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)
    assert sweep.wandb_key_present()
    assert sweep._wandb_endpoint() == (urlsplit(DEFAULT_BASE_URL).hostname, 443)


def test_a_disabled_run_records_no_wandb_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WANDB_MODE=disabled: summary.json must not name a run that does not exist (frep-eval would resume it)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    loggers = sweep.wandb_logger(str(tmp_path), project="test", name="run")
    trainer = SimpleNamespace(loggers=loggers, is_global_zero=True)
    sweep.start_wandb(trainer, OmegaConf.create({}))
    assert sweep.wandb_run_id(trainer) is None
    loggers[1].experiment.finish()
