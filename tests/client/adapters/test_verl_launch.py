"""The verl launch documented in docs/trainers/verl.md, through verl's real entry point.

verl's own Hydra config (`ppo_trainer`) composes the page's overrides, and verl's real
`main_ppo.run_ppo` builds the `ray.init` arguments from them; `ray.init` is the boundary
stubbed here (it would start a cluster). The runtime env it receives must name our setup
hook and carry the settings, and running that hook with those variables must configure
the adapter as the page says.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("verl.trainer.main_ppo")

from hydra import compose, initialize_config_dir  # noqa: E402

from anchorcredit.client.adapters import verl as ac_verl  # noqa: E402

DOC = Path(__file__).resolve().parents[3] / "docs" / "trainers" / "verl.md"


def _documented_overrides() -> list[str]:
    block = DOC.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    env = block.split("ENV=", 1)[1].split("\n", 1)[0].strip()
    command = block.replace("\\\n", " ").replace("$ENV", env)
    words = shlex.split(command, comments=True)
    return [w for w in words if w.startswith(f"+{env}.")]


class _RayInitCalled(Exception):
    pass


def test_documented_overrides_reach_ray_init_and_configure_the_adapter(monkeypatch):
    import ray
    from verl.trainer import main_ppo

    overrides = _documented_overrides()
    assert len(overrides) >= 3, overrides
    config_dir = Path(main_ppo.__file__).parent / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)

    seen: dict[str, Any] = {}

    def fake_init(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise _RayInitCalled

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(_RayInitCalled):
        main_ppo.run_ppo(config, task_runner_class=object)  # stops at ray.init

    runtime_env = seen["runtime_env"]
    hook = runtime_env["worker_process_setup_hook"]
    assert hook == "anchorcredit.client.adapters.verl.install_from_env"
    env_vars = runtime_env["env_vars"]
    assert env_vars["ANCHORCREDIT_TARGETS"] == "credit-svc:50051"
    assert json.loads(env_vars["ANCHORCREDIT_PARAMS"]) == {"q": 0.4}
    assert "TOKENIZERS_PARALLELISM" in env_vars  # verl's own defaults merged, not replaced

    # What Ray does in each worker: set the variables, import and call the hook by name.
    for name, value in env_vars.items():
        if name.startswith("ANCHORCREDIT_"):
            monkeypatch.setenv(name, str(value))
    module, _, func = hook.rpartition(".")
    getattr(importlib.import_module(module), func)()
    try:
        cfg = ac_verl._CONFIG
        assert cfg.strategy == os.environ["ANCHORCREDIT_STRATEGY"] == "coupled_rhythm"
        assert cfg.params == {"q": 0.4}
        assert cfg.get_client().targets == ["credit-svc:50051"]
    finally:
        ac_verl.install(sync=False)()  # replace and undo (closes the client it built)
