"""`import anchorcredit` and the light client never pull in torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "anchorcredit",
        "anchorcredit.client",
        "anchorcredit.client.adapters.summary",
        "anchorcredit.v1.credit_pb2_grpc",
    ],
)
def test_import_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_lazy_scorer_export_is_declared():
    import anchorcredit

    assert "Scorer" in anchorcredit.__all__
    with pytest.raises(AttributeError):
        anchorcredit.no_such_thing  # noqa: B018


def test_cli_help_lists_every_subcommand_without_torch():
    code = (
        "import sys, contextlib, io\n"
        "from anchorcredit.cli import SUBCOMMANDS, build_parser\n"
        "text = build_parser().format_help()\n"
        "assert all(name in text for name in SUBCOMMANDS), text\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_version_without_torch():
    code = (
        "import sys, contextlib, io\n"
        "from anchorcredit import __version__\n"
        "from anchorcredit.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['--version'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert out.getvalue().strip() == f'anchorcredit {__version__}', out.getvalue()\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
