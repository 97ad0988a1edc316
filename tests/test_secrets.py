"""Credentials never travel inside a location. A URL with a user name or password, a presigned
query or a token is refused in one line, the credential shown as ***, before any command writes
anything (Hydra's .hydra/ included); HTTP logins come from ~/.netrc and S3's from the AWS
variables, which no file of a run ever holds."""

import base64
import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
from conftest import run_cli, run_here
from helpers.shards import edit_manifest

from alexnet_dist import credentials
from alexnet_dist.bench import cli as bench_cli
from alexnet_dist.cli import evaluate, predict, prepare
from alexnet_dist.data import store

NETRC = "put the login in ~/.netrc (machine HOST login USER password PASSWORD), which is read for http(s)://"
AWS = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
PRINTED = "would be printed and stored with it"

# (a location with a credential, the secrets in it, the location as the error line shows it, why)
LOCATIONS = [
    (
        "http://alice:Pa55-of-alice@127.0.0.1:9/shards",
        ["Pa55-of-alice"],
        "http://***@127.0.0.1:9/shards",
        f"a user name or password in a URL {PRINTED}; take it out and {NETRC}",
    ),
    (
        "https://ghp_tokenAsUserName42@127.0.0.1:9/shards",
        ["ghp_tokenAsUserName42"],
        "https://***@127.0.0.1:9/shards",
        f"a user name or password in a URL {PRINTED}; take it out and {NETRC}",
    ),
    (
        "https://bucket.s3.amazonaws.com/shards?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAPRESIGNEDKEY77%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=5e1f0bd7c0ffee0ddba11",
        ["AKIAPRESIGNEDKEY77", "5e1f0bd7c0ffee0ddba11"],
        "https://bucket.s3.amazonaws.com/shards?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
        "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=***",
        f"a presigned URL's credentials {PRINTED}; give s3://BUCKET/KEY and {AWS}",
    ),
    (
        "http://127.0.0.1:9/shards?token=tok-9f8e7d6c5b",
        ["tok-9f8e7d6c5b"],
        "http://127.0.0.1:9/shards?token=***",
        f"a token= in a URL {PRINTED}; take it out and {NETRC}",
    ),
    (
        "s3://AKIAINURLKEY99:wJalrInUrlSecret@shards/synthetic",
        ["AKIAINURLKEY99", "wJalrInUrlSecret"],
        "s3://***@shards/synthetic",
        f"a user name or password in a URL {PRINTED}; take it out and {AWS}",
    ),
]
IDS = ["user-password", "user", "presigned", "token", "s3-keys"]


def files_holding(folder: Path, secrets: list[str]) -> list[str]:
    """Every file under `folder` (at any depth) that holds one of the secrets."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)]


def assert_refused(outcome, line: str, secrets: list[str], folder: Path) -> None:
    assert outcome.returncode == 2, outcome
    assert outcome.stderr.strip().splitlines() == [line]
    for secret in secrets:
        assert secret not in outcome.stdout + outcome.stderr
    assert files_holding(folder, secrets) == []


@pytest.mark.parametrize("location, secrets, shown, why", LOCATIONS, ids=IDS)
def test_training_refuses_a_data_root_with_a_credential_before_hydra_writes(
    train_here, tmp_path, location, secrets, shown, why
):
    outcome = train_here("experiment=smoke", "logger=csv", f"data.root={location}", "run_id=secret")
    assert_refused(outcome, f"error: data.root={shown}: {why}", secrets, tmp_path)
    assert not (tmp_path / "runs").exists()  # no .hydra/overrides.yaml, no run directory


def test_training_refuses_a_credential_from_a_config_file_or_the_environment(train_here, tmp_path, cli_env):
    location, secrets, shown, why = LOCATIONS[0]
    mine = tmp_path / "mine" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text(f"# @package _global_\nexperiment_name: mine\ndata:\n  root: {location}\n")
    outcome = train_here("--config-dir", tmp_path / "mine", "experiment=mine", "logger=csv", "run_id=file")
    assert_refused(outcome, f"error: data.root={shown}: {why}", secrets, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    # through an interpolation Hydra stores as written: refused once it is resolved, nothing stored
    cli_env["DATA_URL"] = location  # the environment train_here runs the command in
    outcome = train_here("experiment=smoke", "logger=csv", "data.root=${oc.env:DATA_URL}", "run_id=env")
    assert_refused(outcome, f"error: data.root={shown}: {why}", secrets, tmp_path / "runs")
    assert not (tmp_path / "runs/smoke/env/config.yaml").exists()


@pytest.mark.parametrize("location, secrets, shown, why", LOCATIONS, ids=IDS)
def test_a_manifest_naming_a_tar_with_a_credential_is_refused(
    train_here, tmp_path, synthetic_root, location, secrets, shown, why
):
    """A manifest made by other tools (or edited) is held to the same rule as a command line."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(synthetic_root / "manifest.json", data)
    edit_manifest(data, lambda m: m["splits"]["val"]["shards"][1].update(tar=location))
    outcome = train_here("experiment=smoke", "logger=csv", f"data.root={data}", "run_id=manifest")
    line = (
        f"error: {data}/manifest.json: shard 1 of split 'val' is at {shown}: {why}; not as "
        "alexnet-prepare writes it: re-run alexnet-prepare"
    )
    assert_refused(outcome, line, secrets, tmp_path / "runs")


@pytest.mark.parametrize("location, secrets, shown, why", LOCATIONS, ids=IDS)
def test_prepare_index_refuses_a_location_with_a_credential(capsys, tmp_path, location, secrets, shown, why):
    out = tmp_path / "out"
    for train, named in ((["--train", location], f"--train {shown}"), ([f"--train={location}"], f"--train={shown}")):
        args = ["index", *train, "--val-fraction", "0.1", "--out", out]
        outcome = run_here(prepare.main, *args, capsys=capsys, check=False)
        assert_refused(outcome, f"error: {named}: {why}", secrets, tmp_path)
        assert not out.exists()


def test_prepare_refuses_an_s3_out_with_keys_in_it(capsys, tmp_path, synthetic_root):
    location, secrets, shown, why = LOCATIONS[4]
    outcome = run_here(
        prepare.main, "synthetic", "--out", location, "--staging", tmp_path / "staging", capsys=capsys, check=False
    )
    assert_refused(outcome, f"error: --out {shown}: {why}", secrets, tmp_path)


@pytest.mark.parametrize("location, secrets, shown, why", LOCATIONS[:4], ids=IDS[:4])
def test_predict_and_the_loader_benchmark_refuse_a_location_with_a_credential(
    capsys, tmp_path, location, secrets, shown, why
):
    outcome = run_here(predict.main, f"model={tmp_path}", f"images={location}", capsys=capsys, check=False)
    assert_refused(outcome, f"error: images={shown}: {why}", secrets, tmp_path)
    outcome = run_here(bench_cli.main, "loader", "--data", location, capsys=capsys, check=False)
    assert_refused(outcome, f"error: --data {shown}: {why}", secrets, tmp_path)


def test_redact_hides_every_credential_of_every_url_in_a_line():
    line = (
        "http://bob:hunter2@host/a.tar: cannot be read; s3://K:S@bucket/b and "
        "https://h/c?X-Amz-Credential=AK%2Fx&X-Amz-Date=1&X-Amz-Signature=ff&v=2 and http://h/d?api_key=k1&access_token=t1"
    )
    assert credentials.redact(line) == (
        "http://***@host/a.tar: cannot be read; s3://***@bucket/b and "
        "https://h/c?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***&v=2 and http://h/d?api_key=***&access_token=***"
    )
    # what carries none is left as it is, and says so
    for plain in ("http://host:8080/shards/{000000..000009}.tar?v=3", "s3://bucket/prefix/", "/data/x@y/shards"):
        assert credentials.redact(plain) == plain
        assert credentials.credentials_in(plain) is None


@pytest.mark.slow
def test_aws_keys_in_the_environment_are_never_written_and_eval_refuses_credentials(
    tmp_path, capsys, object_store, synthetic_root, cli_env
):
    """A run from s3:// with W&B (offline) and its checkpoint: the AWS keys it read from the
    environment are in no file of it; alexnet-eval of that checkpoint refuses a data.root with
    a credential in one line."""
    url = object_store.upload(synthetic_root, "s3://secrets/synthetic")
    keys = {"AWS_ACCESS_KEY_ID": "AKIAENVKEYNOTSTORED1", "AWS_SECRET_ACCESS_KEY": "envSecretNeverWritten/42"}
    env = {**cli_env, **keys}  # moto takes any keys: these are the ones the run signs its requests with
    run_cli(
        "alexnet-train",
        "experiment=smoke",
        "logger=wandb",
        "+trainer.enable_progress_bar=false",
        "trainer.max_steps=3",
        f"data.root={url}",
        "run_id=aws",
        cwd=tmp_path,
        env=env,
    )
    run_dir = tmp_path / "runs/smoke/aws"
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb")), "no W&B file to look into"
    assert (run_dir / "checkpoints/last.ckpt").exists()
    assert files_holding(tmp_path, list(keys.values())) == []
    for location, secrets, shown, why in LOCATIONS:
        outcome = run_here(
            evaluate.main,
            f"ckpt_path={run_dir}/checkpoints/last.ckpt",
            f"data.root={location}",
            capsys=capsys,
            check=False,
        )
        assert_refused(outcome, f"error: data.root={shown}: {why}", secrets, tmp_path)


class LoginHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder to alice alone (HTTP Basic authentication), as a protected store would."""

    login = "Basic " + base64.b64encode(b"alice:netrc-Pa55").decode()

    def do_GET(self):
        if self.headers.get("Authorization") != self.login:
            self.send_error(401, "Unauthorized")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def login_server(synthetic_root):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(LoginHandler, directory=str(synthetic_root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_http_login_comes_from_netrc_and_is_stored_nowhere(
    capsys, tmp_path, monkeypatch, login_server, synthetic_root
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]["tar"]
    location = f"{login_server}/{shard}"
    args = [
        "index",
        "--train",
        f"{login_server}/train/{{000000..000007}}.tar",
        "--val",
        f"{login_server}/val/{{000000..000007}}.tar",
    ]
    args += ["--out", tmp_path / "index", "--workers", "1", "--sample", "50"]
    # no ~/.netrc: the server's refusal, at once and in one line
    outcome = run_here(prepare.main, *args, capsys=capsys, check=False)
    assert outcome.returncode == 2
    assert outcome.stderr.strip().splitlines() == [
        f"error: {login_server}/train/000000.tar: cannot be read (HTTP 401 Unauthorized); check the location and "
        "the settings"
    ]
    netrc = tmp_path / "home/.netrc"
    netrc.write_text("machine 127.0.0.1 login alice password netrc-Pa55\n")
    netrc.chmod(0o644)  # others may read it: refused, as curl's users are warned
    outcome = run_here(prepare.main, *args, capsys=capsys, check=False)
    assert outcome.returncode == 2
    assert outcome.stderr.strip().splitlines() == [
        f"error: {netrc}: ~/.netrc access too permissive: access permissions must restrict access to only the owner"
        "; fix it: one line per server, machine HOST login USER password PASSWORD, readable by you alone "
        "(chmod 600)"
    ]
    # the same file with a line for another server only: a host it holds no login for is read as without it
    netrc.write_text("machine other.example.org login alice password netrc-Pa55\n")
    assert run_here(prepare.main, *args, capsys=capsys, check=False).stderr.strip().splitlines() == [
        f"error: {login_server}/train/000000.tar: cannot be read (HTTP 401 Unauthorized); check the location and "
        "the settings"
    ]
    netrc.write_text("machine 127.0.0.1 login alice password netrc-Pa55\n")
    netrc.chmod(0o600)
    assert store.read_bytes(location) == (synthetic_root / shard).read_bytes()
    outcome = run_here(prepare.main, *args, capsys=capsys)
    assert "train: 2000 images in 8 shards" in outcome.stdout
    assert "netrc-Pa55" not in outcome.stdout + outcome.stderr
    assert files_holding(tmp_path / "index", ["netrc-Pa55", "alice"]) == []
