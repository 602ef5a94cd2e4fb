"""Tests of check_config.py: it passes an image that matches the Dockerfile and names each kind
of difference. The layouts here are written by the tests; `hack/image.sh check` runs the check
against the layout umoci builds.

    python -m unittest discover --start-directory image --pattern 'test_*.py'
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import check_config  # noqa: E402

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
CARGO = "cargo build --release --locked --package mailroom --bin mailroom"
NAME = "ghcr.io/mailroom-dev/mailroom:0.1.0"
COMMIT = "0123456789ab"


def layer(complete: bool = True) -> bytes:
    """A gzipped tar holding /mailroom; without its padding and trailer when not complete."""
    data = b"\x7fELF not really\n"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("mailroom")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
    body = raw.getvalue()
    if not complete:
        # What umoci 0.4.7's insert wrote: the entries, then nothing.
        body = body[: body.index(data) + len(data)]
    return gzip.compress(body, mtime=0)


class Fixture:
    """A temporary directory with a Dockerfile and an OCI layout to check against each other."""

    def __init__(self, root: Path):
        self.root = root
        self.dockerfile = root / "Dockerfile"
        self.layout = root / "layout"
        shutil.copy(DOCKERFILE, self.dockerfile)

    def edit(self, old: str, new: str) -> None:
        """Replaces text in the fixture's Dockerfile; the text must be there."""
        text = self.dockerfile.read_text()
        if old not in text:
            raise AssertionError(f"{old!r} is not in the Dockerfile")
        self.dockerfile.write_text(text.replace(old, new))

    def blob(self, data: bytes) -> dict:
        """Stores a blob and returns its descriptor (without mediaType)."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.layout / "blobs" / "sha256" / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    def write_layout(self, config: dict, name: str = NAME, layers: list[bytes] | None = None) -> None:
        """An OCI layout of one image with the given config fields (None fields left out)."""
        if layers is None:
            layers = [layer(), layer()]
        self.layout.mkdir(parents=True, exist_ok=True)
        (self.layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        fields = {k: v for k, v in config.items() if v is not None}
        for key in ("ExposedPorts", "Volumes"):
            if key in fields:
                fields[key] = {v: {} for v in fields[key]}
        image = {"architecture": "amd64", "os": "linux", "config": fields, "rootfs": {"type": "layers", "diff_ids": []}}
        config_desc = {"mediaType": check_config.CONFIG_TYPE, **self.blob(json.dumps(image).encode())}
        layer_descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **self.blob(b)} for b in layers]
        manifest = {"schemaVersion": 2, "config": config_desc, "layers": layer_descs}
        manifest_desc = {
            "mediaType": check_config.MANIFEST_TYPE,
            **self.blob(json.dumps(manifest).encode()),
            "annotations": {check_config.REF_NAME: name},
        }
        (self.layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}))

    def check(self, *extra: str) -> tuple[int, str]:
        """Runs check_config's main against the fixture; returns its status and its output."""
        out = io.StringIO()
        argv = [
            "--dockerfile", str(self.dockerfile), "--layout", str(self.layout), "--name", NAME,
            "--cargo-command", CARGO, "--build-arg", f"MAILROOM_GIT_COMMIT={COMMIT}", *extra,
        ]  # fmt: skip
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = check_config.main(argv)
        return status, out.getvalue()


def real_config() -> dict:
    """The configuration the real Dockerfile's final stage gives, with the test's commit."""
    stages = check_config.parse_stages(DOCKERFILE, {"MAILROOM_GIT_COMMIT": COMMIT})
    return check_config.dockerfile_config(stages[-1])


class RealDockerfile(unittest.TestCase):
    """What the check reads from the Dockerfile in the repository."""

    def test_final_stage(self):
        config = real_config()
        self.assertEqual(config["User"], "65532:65532")
        self.assertEqual(config["WorkingDir"], "/home/nonroot")
        self.assertEqual(config["Entrypoint"], ["/mailroom"])
        self.assertEqual(config["Cmd"], ["run"])
        self.assertEqual(config["ExposedPorts"], ["8080/tcp", "8081/tcp"])
        self.assertEqual(config["Env"][0], f"PATH={check_config.DEFAULT_PATH}")
        self.assertIn("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt", config["Env"])
        labels = config["Labels"]
        self.assertEqual(labels["org.opencontainers.image.revision"], COMMIT)
        self.assertEqual(labels["org.opencontainers.image.version"], "0.1.0")
        self.assertEqual(labels["org.opencontainers.image.source"], "https://github.com/mailroom-dev/mailroom")

    def test_build_arg_overrides_default(self):
        stages = check_config.parse_stages(DOCKERFILE, {"MAILROOM_VERSION": "9.9.9"})
        labels = check_config.dockerfile_config(stages[-1])["Labels"]
        self.assertEqual(labels["org.opencontainers.image.version"], "9.9.9")
        self.assertEqual(labels["org.opencontainers.image.revision"], "unknown")


class Check(unittest.TestCase):
    """check_config against layouts written here."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.fixture = Fixture(Path(tmp.name))

    def assert_mismatch(self, field: str, *extra: str) -> str:
        status, output = self.fixture.check(*extra)
        self.assertEqual(status, 1, output)
        self.assertIn(f"MISMATCH {field}", output)
        return output

    def test_matching_image_passes(self):
        self.fixture.write_layout(real_config())
        status, output = self.fixture.check()
        self.assertEqual(status, 0, output)
        self.assertIn("the image matches the Dockerfile", output)

    def test_different_user(self):
        self.fixture.write_layout(real_config())
        self.fixture.edit("USER 65532:65532", "USER 0:0")
        output = self.assert_mismatch("User")
        self.assertIn('"0:0"', output)

    def test_missing_expose(self):
        self.fixture.write_layout(real_config())
        self.fixture.edit("EXPOSE 8080 8081", "")
        self.assert_mismatch("ExposedPorts")

    def test_one_port_fewer_in_the_image(self):
        config = real_config()
        config["ExposedPorts"] = ["8080/tcp"]
        self.fixture.write_layout(config)
        self.assert_mismatch("ExposedPorts")

    def test_different_cmd(self):
        self.fixture.write_layout(real_config())
        self.fixture.edit('CMD ["run"]', "CMD run")
        output = self.assert_mismatch("Cmd")
        self.assertIn('["/bin/sh", "-c", "run"]', output)

    def test_env_order_and_value(self):
        config = real_config()
        config["Env"] = list(reversed(config["Env"]))
        self.fixture.write_layout(config)
        self.assert_mismatch("Env (order)")

    def test_version_label_from_build_arg(self):
        self.fixture.write_layout(real_config())
        output = self.assert_mismatch(
            "Labels org.opencontainers.image.version", "--build-arg", "MAILROOM_VERSION=9.9.9"
        )
        self.assertNotIn("MISMATCH Labels org.opencontainers.image.revision", output)

    def test_wrong_name(self):
        self.fixture.write_layout(real_config(), name="0.1.0")
        self.assert_mismatch("name (index.json)")

    def test_layer_count(self):
        self.fixture.write_layout(real_config(), layers=[layer()])
        self.assert_mismatch("layers")

    def test_layer_without_tar_trailer(self):
        self.fixture.write_layout(real_config(), layers=[layer(), layer(complete=False)])
        self.assert_mismatch("layer 2 tar")

    def test_different_cargo_command(self):
        self.fixture.write_layout(real_config())
        self.fixture.edit("cargo build --release --locked", "cargo build --release")
        output = self.assert_mismatch("cargo command (stage build)")
        self.assertIn("cargo build --release --package mailroom --bin mailroom", output)

    def test_base_without_rootfs_sh(self):
        self.fixture.write_layout(real_config())
        self.fixture.edit("/image/rootfs.sh /debs /rootfs", "cp -a / /rootfs")
        self.assert_mismatch("base (stage base)")

    def test_dockerfile_under_another_name(self):
        other = self.fixture.root / "Dockerfile.release"
        self.fixture.dockerfile.rename(other)
        self.fixture.dockerfile = other
        self.fixture.write_layout(real_config())
        status, output = self.fixture.check()
        self.assertEqual(status, 0, output)

    def test_unreadable_layout(self):
        status, output = self.fixture.check()
        self.assertEqual(status, 2, output)
        self.assertIn("cannot read", output)


class Words(unittest.TestCase):
    """The pure helpers."""

    def test_shell_commands(self):
        commands = check_config.shell_commands("--mount=type=cache,target=/x a b \\\n && c 'd e'; f|g")
        self.assertEqual(commands, [["--mount=type=cache,target=/x", "a", "b"], ["c", "d e"], ["f"], ["g"]])

    def test_program(self):
        self.assertEqual(check_config.program(["--mount=x", "CC=gcc", "cargo", "build"]), ["cargo", "build"])

    def test_ports(self):
        self.assertEqual(check_config.normalize_port("8080"), ["8080/tcp"])
        self.assertEqual(check_config.normalize_port("53/UDP"), ["53/udp"])
        self.assertEqual(check_config.normalize_port("8000-8001"), ["8000/tcp", "8001/tcp"])


if __name__ == "__main__":
    unittest.main()
