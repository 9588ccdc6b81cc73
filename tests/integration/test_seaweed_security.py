"""The embedded SeaweedFS serves data only through S3 with keys (issue 14, finding 1).

Against the real server of the `seaweed` fixture: anonymous reads, writes and deletes on the
filer, master and volume HTTP ports, and an outside gRPC client, get nothing and change nothing,
while S3 with the keys still puts, gets, lists and deletes.
"""

import subprocess
import uuid

import httpx
import pytest

pytestmark = pytest.mark.integration

EVIL_ORIGIN = "http://evil.example"


def _anonymous(method: str, url: str, headers: dict | None = None, **kwargs) -> httpx.Response | None:
    """The response to an unauthenticated request, or None when the port refused the connection."""
    try:
        return httpx.request(method, url, timeout=5, headers={"Origin": EVIL_ORIGIN, **(headers or {})}, **kwargs)
    except httpx.TransportError:
        return None


def _refused(response: httpx.Response | None, secret: bytes) -> bool:
    return response is None or (response.status_code >= 400 and secret not in response.content)


@pytest.fixture
def secret_object(seaweed):
    """A bucket and an object in it, written through S3 with the keys."""
    client = seaweed.client()
    bucket = "sec-" + uuid.uuid4().hex[:12]
    client.create_bucket(Bucket=bucket)
    secret = b"secret-" + uuid.uuid4().hex.encode()
    client.put_object(Bucket=bucket, Key="models/champion.json", Body=secret)
    return client, bucket, "models/champion.json", secret


def test_filer_http_port_serves_nothing_anonymously(seaweed, secret_object):
    client, bucket, key, secret = secret_object
    filer = f"http://127.0.0.1:{seaweed.s3_port + 3}"
    url = f"{filer}/buckets/{bucket}/{key}"
    got = _anonymous("GET", url)
    assert _refused(got, secret), (got.status_code, got.text[:200])
    assert got is None or got.headers.get("access-control-allow-origin") is None
    listing = _anonymous("GET", f"{filer}/buckets/{bucket}/models/", headers={"Accept": "application/json"})
    assert _refused(listing, b"champion.json")
    put = _anonymous("POST", url, files={"file": ("champion.json", b"overwritten")})
    assert put is None or put.status_code >= 400
    deleted = _anonymous("DELETE", url)
    assert deleted is None or deleted.status_code >= 400
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == secret


def test_master_http_port_hands_out_no_file_ids_or_locations(seaweed, secret_object):
    master = f"http://127.0.0.1:{seaweed.s3_port + 1}"
    for path in ("/dir/assign", "/dir/lookup?volumeId=1", "/dir/status", "/vol/status", "/submit"):
        response = _anonymous("GET", master + path)
        assert response is None or response.status_code >= 400, (path, response.status_code, response.text[:200])
    submitted = _anonymous("POST", master + "/submit", files={"file": ("x", b"evil")})
    assert submitted is None or submitted.status_code >= 400


def test_volume_http_port_needs_a_signed_token(seaweed, secret_object):
    _, _, _, secret = secret_object
    volume = f"http://127.0.0.1:{seaweed.s3_port + 2}"
    # Volume ids are small integers; any file id of a volume is refused without a JWT.
    for volume_id in range(1, 16):
        fid = f"{volume_id},01637037d6"
        got = _anonymous("GET", f"{volume}/{fid}")
        assert _refused(got, secret), (fid, got.status_code, got.text[:200])
        assert got is None or got.status_code == 401
    put = _anonymous("POST", f"{volume}/3,01637037d6", files={"file": ("x", b"evil")})
    assert put is None or put.status_code == 401
    deleted = _anonymous("DELETE", f"{volume}/3,01637037d6")
    assert deleted is None or deleted.status_code == 401


def test_s3_with_keys_still_puts_gets_lists_and_deletes(seaweed, secret_object):
    client, bucket, key, secret = secret_object
    client.put_object(Bucket=bucket, Key="models/other.json", Body=b"2")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == secret
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="models/")["Contents"]]
    assert keys == ["models/champion.json", "models/other.json"]
    client.delete_object(Bucket=bucket, Key="models/other.json")
    assert [item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]] == [key]
    anonymous = _anonymous("GET", f"{seaweed.endpoint_url}/{bucket}/{key}")
    assert _refused(anonymous, secret)


def test_grpc_ports_refuse_a_client_without_the_certificate(seaweed, secret_object, tmp_path):
    """`weed shell` from a folder with no security.toml: an outside gRPC client cannot reach the
    filer or master, so it can neither read nor delete (before: `fs.rm` deleted the object)."""
    from dermflow.ops.stack import venv_bin

    client, bucket, key, secret = secret_object
    commands = f"fs.cat /buckets/{bucket}/{key}\nfs.rm /buckets/{bucket}/{key}\nexit\n"
    try:
        shell = subprocess.run(
            [venv_bin("weed"), "shell", f"-master=127.0.0.1:{seaweed.s3_port + 1}",
             f"-filer=127.0.0.1:{seaweed.s3_port + 3}"],
            input=commands, capture_output=True, text=True, cwd=tmp_path, timeout=20)
        output = shell.stdout + shell.stderr
    except subprocess.TimeoutExpired:  # it keeps retrying the TLS handshake
        output = ""
    assert secret.decode() not in output
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == secret


def test_security_config_is_private_and_telemetry_off(seaweed):
    path = seaweed.security_dir / "security.toml"
    for private in (path, seaweed.security_dir / "seaweedfs.key"):
        assert private.stat().st_mode & 0o077 == 0
    assert "[jwt.signing]" in path.read_text()
    assert "-master.telemetry=false" in seaweed.argv()
