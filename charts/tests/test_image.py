"""The Dockerfile, read with BuildKit's own parser (PyPI `dockerfile`), and its agreement
with the chart. No Docker engine is needed (nor available here to build it)."""

from __future__ import annotations

import re
import tomllib

import dockerfile
import yaml

import values_table

REPO = values_table.REPO


def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(REPO / "Dockerfile")))


def stages() -> list[list[dockerfile.Command]]:
    result: list[list[dockerfile.Command]] = []
    for command in instructions():
        if command.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(command)
    return result


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_build_stage_uses_a_rust_new_enough_for_the_workspace() -> None:
    args = {}
    for command in instructions():
        if command.cmd == "ARG" and "=" in command.value[0]:
            key, value = command.value[0].split("=", 1)
            args[key] = value
    build = stages()[0]
    image = build[0].value[0]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
    match = re.fullmatch(r"rust:(\d+\.\d+(?:\.\d+)?)-\w+", image)
    assert match, f"the build stage is not an official Rust image: {image}"
    workspace = tomllib.loads((REPO / "Cargo.toml").read_text())
    assert version_tuple(match.group(1))[:2] >= version_tuple(workspace["workspace"]["package"]["rust-version"])[:2]
    runs = " ".join(c.original for c in build if c.cmd == "RUN")
    assert "musl-tools" in runs and "rustup target add x86_64-unknown-linux-musl" in runs
    assert "cargo build --release --locked -p machinist --target x86_64-unknown-linux-musl" in runs


def test_runtime_stage_is_minimal_and_non_root() -> None:
    runtime = stages()[-1]
    assert runtime[0].value[0] in ("scratch", "gcr.io/distroless/static-debian12:nonroot")
    assert not [c for c in runtime if c.cmd == "RUN"], "the runtime stage has no shell"
    copied = {c.value[-1] for c in runtime if c.cmd == "COPY"}
    assert {"/machinist", "/etc/ssl/certs/ca-certificates.crt"} <= copied
    (user,) = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert user == "65532:65532"
    (entrypoint,) = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    (cmd,) = [c for c in runtime if c.cmd == "CMD"]
    assert entrypoint.json and list(entrypoint.value) == ["/machinist"]
    assert cmd.json and list(cmd.value) == ["run"]


def test_chart_runs_the_image_as_its_user() -> None:
    values = yaml.safe_load((values_table.CHART / "values.yaml").read_text())
    uid, gid = (int(x) for x in [c.value[0] for c in stages()[-1] if c.cmd == "USER"][0].split(":"))
    assert values["securityContext"]["runAsUser"] == uid
    assert values["securityContext"]["runAsGroup"] == gid
    assert values["podSecurityContext"]["runAsUser"] == uid


def test_dockerignore() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {"target/", ".venv/", ".sandbox/", ".git/"} <= ignored
