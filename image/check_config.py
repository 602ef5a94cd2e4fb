#!/usr/bin/env python3
"""Compares the operator image that hack/image.sh builds with the one the Dockerfile describes.

    check_config.py --dockerfile Dockerfile --layout target/image-check/layout \
        --name ghcr.io/mailroom-dev/mailroom:0.1.0 \
        --cargo-command "cargo build --release --locked --package mailroom --bin mailroom" \
        [--build-arg NAME=VALUE ...]

The Dockerfile's final stage gives the configuration a `docker build` (BuildKit) would write:
USER, WORKDIR, ENV (with the PATH BuildKit always sets), EXPOSE, ENTRYPOINT, CMD, LABEL, VOLUME
and STOPSIGNAL, with ARG defaults and --build-arg values substituted. The OCI layout gives the
configuration umoci wrote (index.json, then the manifest, then the config blob). Each field is
compared, and so are the image's name in index.json, its number of layers against the final
stage's COPY/ADD/RUN lines, each blob's digest, and each layer being a complete tar. The stages
the final one copies from must be the ones hack/image.sh repeats: the stage that provides the
entrypoint runs exactly the cargo command given, the stage that provides / runs image/rootfs.sh.

Prints every field, the mismatched ones marked, and exits 1 on any mismatch (2 when an input
cannot be read).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import posixpath
import shlex
import sys
import tarfile
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser
from dockerfile_parse.util import WordSplitter, extract_key_values

# What BuildKit puts in PATH when the base image sets none (FROM scratch).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
# The configuration fields compared, in the order they are printed.
FIELDS = ("User", "WorkingDir", "Env", "ExposedPorts", "Entrypoint", "Cmd", "Labels", "Volumes", "StopSignal")
# Command separators in a RUN line's shell text.
SEPARATORS = {"&&", "||", ";", "|", "&"}


class InputError(Exception):
    """A Dockerfile or layout that cannot be read or understood."""


@dataclasses.dataclass
class Instruction:
    """One Dockerfile instruction with the ARG and ENV values in force on its line."""

    name: str
    value: str
    args: dict[str, str]
    envs: dict[str, str]

    def expand(self, text: str) -> str:
        """The text with $VAR / ${VAR} replaced as Docker does for this instruction."""
        return WordSplitter(text, args=self.args, envs=self.envs).dequote()


@dataclasses.dataclass
class Stage:
    """One FROM and the instructions after it."""

    index: int
    base: str
    name: str | None
    instructions: list[Instruction]

    def runs(self) -> list[list[str]]:
        """The commands (as words) of every shell-form RUN line of the stage."""
        commands = []
        for insn in self.instructions:
            if insn.name == "RUN" and not insn.value.lstrip().startswith("["):
                commands.extend(shell_commands(insn.value))
        return commands


@dataclasses.dataclass
class Mismatch:
    """A field or property in which the image differs from the Dockerfile."""

    field: str
    dockerfile: Any
    image: Any


def parse_stages(dockerfile: Path, build_args: dict[str, str]) -> list[Stage]:
    """The Dockerfile's stages, ARG defaults and build args applied as `docker build` would."""
    try:
        # A file object, not a path: the parser takes a path not ending in "Dockerfile" for a directory.
        with io.BytesIO(dockerfile.read_bytes()) as content:
            parser = DockerfileParser(fileobj=content, build_args=build_args, env_replace=True)
            structure = parser.structure
            contexts = parser.context_structure
    except (OSError, ValueError) as err:
        raise InputError(f"cannot parse {dockerfile}: {err}") from err
    stages: list[Stage] = []
    before = None
    for insn, after in zip(structure, contexts, strict=True):
        name = insn["instruction"]
        if name == "FROM":
            words = insn["value"].split()
            stage_name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            base = next((w for w in words if not w.startswith("--")), "")
            stages.append(Stage(len(stages), base, stage_name, []))
        elif name != "COMMENT" and stages and before is not None:
            # The values in force before the line: an ENV or ARG line does not see its own.
            stages[-1].instructions.append(Instruction(name, insn["value"], dict(before.args), dict(before.envs)))
        before = after
    if not stages:
        raise InputError(f"{dockerfile} has no FROM")
    return stages


def exec_form(value: str) -> list[str] | None:
    """The words of a JSON (exec) form, or None for the shell form."""
    text = value.strip()
    if not text.startswith("["):
        return None
    try:
        words = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        return None
    return words


def shell_commands(text: str) -> list[list[str]]:
    """Splits a RUN line's shell text into its simple commands, each as words."""
    lexer = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def program(command: list[str]) -> list[str]:
    """A command without RUN's --flags and leading NAME=value assignments."""
    words = list(command)
    while words and (words[0].startswith("--") or ("=" in words[0] and words[0].split("=", 1)[0].isidentifier())):
        words.pop(0)
    return words


def normalize_port(port: str) -> list[str]:
    """EXPOSE's '8080', '8080/udp' or '8000-8001' as Docker's 'port/proto' keys."""
    number, _, proto = port.partition("/")
    proto = (proto or "tcp").lower()
    first, _, last = number.partition("-")
    if last:
        return [f"{p}/{proto}" for p in range(int(first), int(last) + 1)]
    return [f"{int(first)}/{proto}"]


def dockerfile_config(stage: Stage) -> dict[str, Any]:
    """The OCI config fields BuildKit writes for the final stage (FROM scratch only)."""
    if stage.base != "scratch":
        raise InputError(f"the final stage is FROM {stage.base}: only FROM scratch has a known base configuration")
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    config: dict[str, Any] = {field: None for field in FIELDS}
    shell = ["/bin/sh", "-c"]
    workdir = ""
    ports: set[str] = set()
    labels: dict[str, str] = {}
    volumes: set[str] = set()
    cmd_set = False
    for insn in stage.instructions:
        if insn.name in ("ENV", "LABEL"):
            pairs = extract_key_values(env_replace=True, args=insn.args, envs=insn.envs, instruction_value=insn.value)
            (env if insn.name == "ENV" else labels).update(pairs)
        elif insn.name == "USER":
            config["User"] = insn.expand(insn.value.strip())
        elif insn.name == "WORKDIR":
            path = insn.expand(insn.value.strip())
            workdir = posixpath.normpath(posixpath.join(workdir or "/", path))
        elif insn.name == "EXPOSE":
            for word in insn.expand(insn.value).split():
                ports.update(normalize_port(word))
        elif insn.name == "SHELL":
            shell = exec_form(insn.value) or shell
        elif insn.name in ("ENTRYPOINT", "CMD"):
            words = exec_form(insn.value)
            if words is None:
                words = [*shell, insn.value.strip()]
            config["Entrypoint" if insn.name == "ENTRYPOINT" else "Cmd"] = words
            if insn.name == "CMD":
                cmd_set = True
            elif not cmd_set:
                # BuildKit: an ENTRYPOINT resets the CMD inherited from the base.
                config["Cmd"] = None
        elif insn.name == "VOLUME":
            volumes.update(exec_form(insn.value) or insn.expand(insn.value).split())
        elif insn.name == "STOPSIGNAL":
            config["StopSignal"] = insn.expand(insn.value.strip())
    config["Env"] = [f"{k}={v}" for k, v in env.items()]
    config["WorkingDir"] = workdir or None
    config["ExposedPorts"] = sorted(ports) or None
    config["Labels"] = labels or None
    config["Volumes"] = sorted(volumes) or None
    return config


@dataclasses.dataclass
class Layout:
    """An OCI image layout holding one image."""

    root: Path
    index: dict[str, Any]
    descriptor: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]

    def blob(self, descriptor: dict[str, Any]) -> Path:
        """The file of a descriptor's blob."""
        algorithm, _, digest = descriptor["digest"].partition(":")
        return self.root / "blobs" / algorithm / digest


def read_json(path: Path) -> Any:
    """A JSON file's value, or InputError."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}") from err


def read_layout(root: Path) -> Layout:
    """Reads index.json, its one manifest and that manifest's config from layout root."""
    index = read_json(root / "index.json")
    manifests = index.get("manifests") or []
    if len(manifests) != 1:
        raise InputError(f"{root}/index.json lists {len(manifests)} manifests; one was expected")
    descriptor = manifests[0]
    partial = Layout(root, index, descriptor, {}, {})
    manifest = read_json(partial.blob(descriptor))
    partial.manifest = manifest
    partial.config = read_json(partial.blob(manifest.get("config", {"digest": ":"})))
    return partial


def image_config(layout: Layout) -> dict[str, Any]:
    """The compared fields of the image's config, in the form dockerfile_config gives."""
    config = layout.config.get("config") or {}
    values = {field: config.get(field) or None for field in FIELDS}
    for field in ("ExposedPorts", "Volumes"):
        if values[field] is not None:
            values[field] = sorted(values[field])
    return values


def blob_problems(layout: Layout) -> list[Mismatch]:
    """Blobs whose digest or size is not what their descriptor says, and incomplete layers."""
    problems = []
    descriptors = [("manifest", layout.descriptor), ("config", layout.manifest.get("config", {}))]
    descriptors += [(f"layer {i + 1}", d) for i, d in enumerate(layout.manifest.get("layers", []))]
    for what, descriptor in descriptors:
        path = layout.blob(descriptor)
        try:
            data = path.read_bytes()
        except OSError as err:
            problems.append(Mismatch(f"{what} blob", descriptor.get("digest"), f"unreadable: {err}"))
            continue
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest != descriptor.get("digest") or len(data) != descriptor.get("size"):
            problems.append(
                Mismatch(
                    f"{what} blob",
                    f"{descriptor.get('digest')} ({descriptor.get('size')} bytes)",
                    f"{digest} ({len(data)} bytes)",
                )
            )
        if what.startswith("layer"):
            try:
                with tarfile.open(path, mode="r:*") as tar:
                    for _ in tar:
                        pass
            except (tarfile.TarError, OSError, EOFError) as err:
                problems.append(Mismatch(f"{what} tar", "a complete tar", f"{type(err).__name__}: {err}"))
    return problems


def stage_named(stages: list[Stage], ref: str) -> Stage | None:
    """The stage a COPY --from names, by name or index."""
    for stage in stages:
        if stage.name == ref or str(stage.index) == ref:
            return stage
    return None


def copies(stage: Stage) -> list[tuple[str | None, list[str], str]]:
    """Each COPY/ADD of a stage as (its --from, its sources, its destination)."""
    found = []
    for insn in stage.instructions:
        if insn.name not in ("COPY", "ADD"):
            continue
        words = exec_form(insn.value) or shlex.split(insn.value)
        source = None
        paths = []
        for word in words:
            if word.startswith("--from="):
                source = word.split("=", 1)[1]
            elif not word.startswith("--"):
                paths.append(word)
        if len(paths) >= 2:
            found.append((source, paths[:-1], paths[-1]))
    return found


def build_problems(stages: list[Stage], cargo_command: list[str], entrypoint: list[str] | None) -> list[Mismatch]:
    """Differences between the stages the final one copies from and what hack/image.sh runs."""
    problems = []
    final = stages[-1]
    by_destination = {dest.rstrip("/") or "/": src for src, _, dest in copies(final) if src is not None}
    binary = entrypoint[0] if entrypoint else None
    build = stage_named(stages, by_destination.get(binary, "")) if binary else None
    if build is None:
        problems.append(Mismatch("build stage", f"a stage copied to {binary}", "none"))
    else:
        commands = [program(c) for c in build.runs()]
        cargo = [c for c in commands if c[:1] == ["cargo"]]
        if cargo_command not in cargo:
            found = [" ".join(c) for c in cargo] or "no cargo command"
            problems.append(
                Mismatch(f"cargo command (stage {build.name or build.index})", " ".join(cargo_command), found)
            )
    base = stage_named(stages, by_destination.get("/", ""))
    if base is None:
        problems.append(Mismatch("base stage", "a stage copied to /", "none"))
    elif not any(c and c[0].endswith("image/rootfs.sh") for c in (program(c) for c in base.runs())):
        problems.append(Mismatch(f"base (stage {base.name or base.index})", "RUN .../image/rootfs.sh", "no such RUN"))
    return problems


def field_rows(field: str, expected: Any, actual: Any) -> list[tuple[str, Any, Any]]:
    """One row per field; Labels one per label and Env one per variable (and one for the order of
    those in both), so that a difference names the label or variable."""
    if field == "Labels":
        expected, actual = expected or {}, actual or {}
        return [(f"Labels {key}", expected.get(key), actual.get(key)) for key in sorted({*expected, *actual})] or [
            ("Labels", None, None)
        ]
    if field == "Env":
        expected = dict(e.split("=", 1) for e in expected or [])
        actual = dict(e.partition("=")[::2] for e in actual or [])
        rows = [(f"Env {key}", expected.get(key), actual.get(key)) for key in sorted({*expected, *actual})]
        order = ([k for k in expected if k in actual], [k for k in actual if k in expected])
        return [*rows, ("Env (order)", *order)]
    return [(field, expected, actual)]


def compare(
    dockerfile: Path, layout_root: Path, name: str, cargo_command: list[str], build_args: dict[str, str]
) -> tuple[list[tuple[str, Any, Any]], list[Mismatch]]:
    """Every compared field as (field, Dockerfile's, image's), and the mismatches among them."""
    stages = parse_stages(dockerfile, build_args)
    final = stages[-1]
    expected = dockerfile_config(final)
    layout = read_layout(layout_root)
    actual = image_config(layout)
    rows = []
    for field in FIELDS:
        rows.extend(field_rows(field, expected[field], actual[field]))
    layer_lines = sum(1 for insn in final.instructions if insn.name in ("COPY", "ADD", "RUN"))
    rows.append(("layers", layer_lines, len(layout.manifest.get("layers", []))))
    rows.append(("name (index.json)", name, (layout.descriptor.get("annotations") or {}).get(REF_NAME)))
    rows.append(("manifest mediaType", MANIFEST_TYPE, layout.descriptor.get("mediaType")))
    rows.append(("config mediaType", CONFIG_TYPE, layout.manifest.get("config", {}).get("mediaType")))
    rows.append(("os", "linux", layout.config.get("os")))
    mismatches = [Mismatch(f, d, i) for f, d, i in rows if d != i]
    mismatches += blob_problems(layout)
    mismatches += build_problems(stages, cargo_command, expected["Entrypoint"])
    return rows, mismatches


def show(value: Any) -> str:
    """A value as compact JSON."""
    return json.dumps(value, sort_keys=True)


def report(rows: list[tuple[str, Any, Any]], mismatches: list[Mismatch], out=None) -> None:
    """Prints each compared field, marking mismatches, then the other problems found."""
    out = out or sys.stdout
    bad = {m.field for m in mismatches}
    width = max(len(f) for f, _, _ in rows)
    for field, dockerfile, image in rows:
        if field in bad:
            print(f"  MISMATCH {field:<{width}}  Dockerfile: {show(dockerfile)}", file=out)
            print(f"           {'':<{width}}  image:      {show(image)}", file=out)
        else:
            print(f"  ok       {field:<{width}}  {show(image)}", file=out)
    shown = {f for f, _, _ in rows}
    for m in mismatches:
        if m.field not in shown:
            found = m.image if isinstance(m.image, str) else show(m.image)
            print(f"  MISMATCH {m.field}: expected {m.dockerfile}; found {found}", file=out)


def main(argv: list[str] | None = None) -> int:
    """Compares, reports and returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dockerfile", type=Path, required=True)
    parser.add_argument("--layout", type=Path, required=True, help="an OCI image layout holding one image")
    parser.add_argument("--name", required=True, help="the image's full name expected in index.json")
    parser.add_argument("--cargo-command", required=True, help="the cargo command hack/image.sh runs")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    options = parser.parse_args(argv)
    build_args = dict(arg.split("=", 1) for arg in options.build_arg)
    try:
        rows, mismatches = compare(
            options.dockerfile, options.layout, options.name, shlex.split(options.cargo_command), build_args
        )
    except (InputError, ValueError) as err:
        print(f"check_config: error: {err}", file=sys.stderr)
        return 2
    print(f"check_config: {options.dockerfile} (final stage) against {options.layout} ({options.name})")
    report(rows, mismatches)
    if mismatches:
        print(
            f"check_config: {len(mismatches)} mismatch(es): the image hack/image.sh builds differs from the "
            "Dockerfile's; change one to match the other",
            file=sys.stderr,
        )
        return 1
    print("check_config: the image matches the Dockerfile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
