"""`pip install --no-build-isolation ./python` into a venv made with --system-site-packages,
from a copy of the tree without the generated modules (the install must generate them), then
one call to a gradserver from that venv, outside the source tree, with no PYTHONPATH."""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np

import gradservice as gs

INSTALL_SECONDS = 120


def test_pip_install_into_a_venv_and_call_a_server(tmp_path, repo_root, server, tolerance):
    source = tmp_path / "src"
    shutil.copytree(repo_root / "python", source / "python",
                    ignore=shutil.ignore_patterns("_proto", "build", "dist", "*.egg-info",
                                                  "__pycache__"))
    shutil.copytree(repo_root / "proto" / "grad", source / "proto" / "grad",
                    ignore=shutil.ignore_patterns("*.cc", "*.h"))
    assert not (source / "python" / "gradservice" / "_proto").exists()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=INSTALL_SECONDS)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL")}
    env["PIP_NO_INDEX"] = "1"  # offline: the dependencies are Debian's, in the system site
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-build-isolation", str(source / "python")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=INSTALL_SECONDS)
    assert install.returncode == 0, install.stdout + install.stderr

    net = gs.Network([gs.Conv2d("conv1", 1, 3, 3, padding=1), gs.Tanh("act")])
    rng = np.random.default_rng(1)
    params = {p.name: rng.standard_normal(p.shape).astype(np.float32)
              for p in gs.parameter_infos(net)}
    x = rng.standard_normal((2, 1, 5, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for name, value in params.items():
        np.save(tmp_path / f"{name}.npy", value)
    (tmp_path / "net.json").write_text(net.to_json(), encoding="utf-8")

    script = textwrap.dedent(f"""
        import pathlib, sys
        import numpy as np
        import gradservice as gs
        assert pathlib.Path(gs.__file__).resolve().is_relative_to(
            pathlib.Path({str(venv)!r}).resolve()), gs.__file__
        net = gs.Network.from_json("net.json")
        params = {{p.name: np.load(p.name + ".npy") for p in gs.parameter_infos(net)}}
        with gs.Client({str(server)!r}) as client:
            result = client.compute_gradients(net, params, np.load("x.npy"), gs.Sum())
        print(repr(result.loss))
        print(gs.__file__)
    """)
    run = subprocess.run([str(python), "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=INSTALL_SECONDS)
    assert run.returncode == 0, run.stdout + run.stderr
    loss_text, installed_at = run.stdout.split()
    assert "site-packages" in installed_at

    with gs.Client(server) as client:
        expected = client.compute_gradients(net, params, x, gs.Sum()).loss
    assert abs(float(loss_text) - expected) <= tolerance * max(1.0, abs(expected))
