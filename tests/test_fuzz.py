"""schemathesis over kv3d's whole OpenAPI schema, against a real server on the real model.

The served schema declares every request body (kv3d_core/api/openapi.py), so generated
cases -- valid ones that really generate text, and invalid ones of every kind -- reach the
endpoints. The run is bounded (MAX_EXAMPLES per operation, a fixed seed) to stay well
under two minutes on two cores.

Checks: no 5xx (``not_a_server_error``), statuses, content types and headers as declared,
schema-invalid bodies refused, 405 with ``Allow``, the API key enforced (``ignored_auth``).
Not checked: ``positive_data_acceptance``: the JSON schema cannot say everything the
request models check (a non-empty ``prompt``, ``content`` required but for an assistant's
tool calls), so some schema-valid bodies are rightly refused with a 400.
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, running_server

MAX_EXAMPLES = 25
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "negative_data_rejection,unsupported_method,ignored_auth")


def test_schemathesis_finds_no_server_error(tmp_path):
    with running_server(tmp_path, ["server.api_key=fuzz-key", "server.default_max_tokens=4"]) as srv:
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", srv.url + "/openapi.json",
               "-H", "Authorization: Bearer fuzz-key", "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES),
               "--seed", "17", "--request-timeout", "120", "--workers", "1", "--no-color",
               "--report", "junit", "--report-dir", str(tmp_path / "report")]
        env = dict(os.environ, SCHEMATHESIS_HOOKS=str(REPO / "tests" / "fuzz" / "hooks.py"))
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-8000:]
        assert "generated" in out                    # it ran cases, and every one passed
        log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log
