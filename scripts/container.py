#!/usr/bin/env python3
"""The defectflow containers: the serving image (`bentoml containerize`, run and checked for
real) and the training image the Docker work pool runs flows in.

    python scripts/container.py base-image  # the local Debian base image (debootstrap + docker import)
    python scripts/container.py build       # Bento of the production model -> defectflow:<version>, :latest
    python scripts/container.py test        # run it on 127.0.0.1, call /readyz and /predict, check the user
    python scripts/container.py train-image # the project + training deps -> defectflow-train:<version>, :latest
    python scripts/container.py clean       # remove the images this script made

No container registry is needed, only the Debian and Python package mirrors this machine uses:

* Engine: Debian's `docker.io`. When no daemon answers, `dockerd` is started for the session and
  stopped at its end (only that process: a daemon that was already running is left alone). A
  lock file serialises sessions on one machine. The 20.10 client of `docker.io` has BuildKit
  built in; a newer client without the buildx plugin builds with DOCKER_BUILDKIT=0.
* Base image (`docker.base_image` in bentofile.yaml): Debian bookworm `minbase` with python3,
  venv, pip and ca-certificates, made with `debootstrap` from the host's Debian mirror and
  `docker import`ed. It trusts the host's extra CA certificates (TLS interception on
  corporate networks), uses the host's pip index, apt mirror and apt Acquire settings, and
  sets PIP_BREAK_SYSTEM_PACKAGES=1 (BentoML's Dockerfile `pip install`s uv system-wide).
  Its recipe is hashed into a label: an unchanged recipe is reused, a changed one rebuilt.
* Image: `bentoml containerize --opt network=host` (RUN steps reach the mirrors through the
  host's network). BentoML's generated Dockerfile installs build-essential and git for its
  Debian distro (and the whole TensorFlow wheel for a Keras model); a last step drops what
  serving does not need (those packages, uv and Debian's pip, TensorFlow's C++ headers,
  libclang and symbol tables) and flattens the image with `docker export | docker import`,
  keeping its user (bentoml, uid 1034),
  entrypoint, environment and ports. BuildKit's layer cache makes a rebuild of the same
  requirements take seconds.

* Training image (`train-image`): `docker build --network host` of a generated Dockerfile on
  the same base: a venv with the pinned dependencies of pyproject.toml and the `cpu` (or
  `gpu`: tensorflow[and-cuda]) and `docker` (prefect-docker) extras, then the project
  installed editable in /opt/defectflow, user `defectflow` (uid 1000). The Docker work pool
  of `defectflow up --pool docker` starts flow runs from it; the compose stack runs its
  Prefect server and worker from it too.

Every wait is bounded. When no engine can be used, `EngineUnavailable` says why (the tests
skip with that reason).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BENTOFILE = REPO_ROOT / "bentofile.yaml"

SUITE = "bookworm"
VARIANT = "minbase"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
#: Bump when the base recipe changes in a way its inputs below do not capture.
BASE_RECIPE_VERSION = 2
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: The packages of the base image, recorded in it: the slimming step removes every other one.
BASE_PACKAGE_LIST = "/usr/share/defectflow/base-packages.txt"
#: Build-time settings of the base image; the served image does not keep them.
BUILD_ONLY_ENV = ("PIP_", "UV_", "DEBIAN_FRONTEND")
LABEL = "org.defectflow"
#: `make container` keeps this many images of `defectflow` (the current one and the one before).
KEEP_IMAGES = 2
LOCK_FILE = Path(tempfile.gettempdir()) / "defectflow-container.lock"

# Everything the slimming step removes from the image BentoML built (run as root, offline).
SLIM_SCRIPT = r"""
set -eu
site=$(echo /app/.venv/lib/python3*/site-packages)
before=$(du -sm / --exclude=/proc --exclude=/sys 2>/dev/null | cut -f1)
# C++ headers for building TensorFlow ops, and libclang (no module of the served code imports it).
rm -rf "$site/tensorflow/include" "$site/clang" "$site"/libclang-*.dist-info
# Symbol tables of TensorFlow's shared libraries (970 MB; dynamic symbols stay). Only
# TensorFlow's: libraries that auditwheel patched (the *.libs folders, e.g. numpy's OpenBLAS)
# stop loading when stripped ("ELF load command address/offset not page-aligned").
# (A Bento of a TFLite model has no TensorFlow: LiteRT runs it.)
if [ -d "$site/tensorflow" ] && command -v strip > /dev/null; then
  find "$site/tensorflow" -type f \( -name '*.so' -o -name '*.so.*' \) -exec strip --strip-unneeded {} +
fi
# Fail here, not at serving time, if that broke an import of the serving stack.
cat > /tmp/imports.py << 'END'
import importlib, importlib.util
for name in ("numpy", "cv2", "PIL", "keras", "tensorflow", "ai_edge_litert.interpreter", "bentoml"):
    if importlib.util.find_spec(name.split(".")[0]):
        importlib.import_module(name)
END
/app/.venv/bin/python /tmp/imports.py > /dev/null 2>&1 || { /app/.venv/bin/python /tmp/imports.py; exit 1; }
# uv installed the packages; serving does not use it, nor Debian's pip (the app has its venv).
/usr/bin/python3 -m pip uninstall --yes --quiet uv > /dev/null 2>&1 || true
pip_stack=$(dpkg-query -W -f '${binary:Package}\n' python3-pip python3-pip-whl python3-setuptools \
  python3-setuptools-whl python3-wheel python3-venv python3.11-venv 2> /dev/null || true)
# The Debian packages BentoML's Dockerfile added to the base image (build-essential, git, gnupg2...).
dpkg-query -W -f '${binary:Package}\n' | sort > /tmp/now-packages
extra="$(sort BASE_PACKAGE_LIST | comm -13 - /tmp/now-packages) $pip_stack"
if [ -n "$(echo $extra)" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get purge --yes --quiet=2 $extra > /dev/null
fi
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/log/apt \
  /var/log/dpkg.log /var/cache/debconf/*-old /root/.cache /root/.keras /tmp/* /usr/share/man/* \
  /usr/share/info/*
find /usr/share/doc -type f ! -name copyright -delete 2> /dev/null || true
after=$(du -sm / --exclude=/proc --exclude=/sys 2>/dev/null | cut -f1)
echo "slim: $before MB -> $after MB on disk; removed packages: $(echo $extra | wc -w)"
""".replace("BASE_PACKAGE_LIST", BASE_PACKAGE_LIST)


class EngineUnavailable(RuntimeError):
    """No container engine can be used here; the message says why."""


def log(message: str) -> None:
    print(f"[container] {message}", flush=True)


def _run(
    cmd: list[str],
    timeout: float,
    env: dict[str, str] | None = None,
    check: bool = True,
    capture: bool = True,
    input: bytes | None = None,
) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, env=env, timeout=timeout, input=input, capture_output=capture)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{shlex.join(cmd)} did not finish within {timeout:.0f} s") from None
    if check and done.returncode != 0:
        err = (done.stderr or b"").decode(errors="replace")[-4000:] if capture else ""
        raise RuntimeError(f"{shlex.join(cmd)} exited {done.returncode}\n{err}")
    return done


# --------------------------------------------------------------------------- docker engine


def _client_version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [binary, "version", "--format", "{{.Client.Version}}"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"(\d+)\.(\d+)", out.strip())
    return tuple(int(x) for x in match.groups()) if match else None


def _has_buildkit(binary: str, version: tuple[int, ...]) -> bool:
    """Clients before 23.0 (Debian's 20.10) have BuildKit built in; later ones need buildx."""
    if version < (23,):
        return True
    try:
        return (
            subprocess.run(
                [binary, "buildx", "version"], capture_output=True, timeout=20
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def choose_client() -> tuple[str, bool]:
    """The docker client to use and whether it builds with BuildKit."""
    candidates: list[str] = []
    for path in (shutil.which("docker"), "/usr/bin/docker", "/usr/local/bin/docker"):
        if (
            path
            and os.access(path, os.X_OK)
            and os.path.realpath(path) not in map(os.path.realpath, candidates)
        ):
            candidates.append(path)
    clients = [(path, v) for path in candidates if (v := _client_version(path)) is not None]
    if not clients:
        raise EngineUnavailable(
            "no docker client: install Debian's docker.io "
            "(`apt-get install docker.io`, which `make container` does)"
        )
    for path, version in clients:
        if _has_buildkit(path, version):
            return path, True
    return clients[0][0], False


@dataclass
class Docker:
    """A usable docker engine for one session."""

    binary: str
    buildkit: bool
    started_daemon: bool
    shim_dir: Path
    daemon_log: Path | None = None
    notes: list[str] = field(default_factory=list)

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, capture: bool = True
    ) -> subprocess.CompletedProcess:
        return _run([self.binary, *args], timeout=timeout, check=check, capture=capture)

    def out(self, *args: str, timeout: float = 120) -> str:
        return self(*args, timeout=timeout).stdout.decode().strip()

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment in which `docker` (BentoML runs it from PATH) is this client."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.shim_dir}{os.pathsep}{env.get('PATH', '')}"
        env["DOCKER_BUILDKIT"] = "1" if self.buildkit else "0"
        return env

    def image_exists(self, image: str) -> bool:
        return self("image", "inspect", image, check=False).returncode == 0

    def image_size(self, image: str) -> int:
        return int(self.out("image", "inspect", "--format", "{{.Size}}", image))


def _daemon_answers(binary: str) -> tuple[bool, str]:
    try:
        done = subprocess.run(
            [binary, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return False, "docker version timed out"
    return done.returncode == 0, (done.stderr or done.stdout).strip()


@contextlib.contextmanager
def _session_lock(timeout: float) -> Iterator[None]:
    # Read-only is enough for flock, so a lock file another user created still works.
    with os.fdopen(os.open(LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o666)) as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EngineUnavailable(
                        f"another container session holds {LOCK_FILE} for more than {timeout:.0f} s"
                    ) from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stop_daemon(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
        proc.wait(timeout=30)


@contextlib.contextmanager
def engine(
    state_dir: Path, start_timeout: float = 90, lock_timeout: float = 900
) -> Iterator[Docker]:
    """A docker engine for the session: the running daemon, or a `dockerd` started (and
    stopped again at exit) here. Raises EngineUnavailable with the reason when neither works."""
    binary, buildkit = choose_client()
    with (
        _session_lock(lock_timeout),
        tempfile.TemporaryDirectory(prefix="defectflow-docker-") as shim,
    ):
        Path(shim, "docker").symlink_to(binary)
        answers, why = _daemon_answers(binary)
        proc = None
        daemon_log = None
        if not answers:
            dockerd = shutil.which("dockerd") or next(
                (p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if os.access(p, os.X_OK)),
                None,
            )
            if dockerd is None:
                raise EngineUnavailable(
                    f"no docker daemon answers ({why}) and there is no dockerd: "
                    "install Debian's docker.io (`make container` does)"
                )
            if os.geteuid() != 0:
                raise EngineUnavailable(
                    f"no docker daemon answers ({why}) and only root can start dockerd here"
                )
            state_dir.mkdir(parents=True, exist_ok=True)
            daemon_log = state_dir / "dockerd.log"
            with daemon_log.open("ab") as out:
                proc = subprocess.Popen(
                    [dockerd],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            log(f"started dockerd (pid {proc.pid}, log {daemon_log})")
            deadline = time.monotonic() + start_timeout
            while True:
                answers, why = _daemon_answers(binary)
                if answers:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = daemon_log.read_text(errors="replace")[-1500:]
                    _stop_daemon(proc)
                    raise EngineUnavailable(
                        f"dockerd did not come up within {start_timeout:.0f} s "
                        f"(exit code {proc.returncode}): {tail}"
                    )
                time.sleep(0.5)
        docker = Docker(
            binary=binary,
            buildkit=buildkit,
            started_daemon=proc is not None,
            shim_dir=Path(shim),
            daemon_log=daemon_log,
        )
        log(
            f"docker client {binary} ({'BuildKit' if buildkit else 'DOCKER_BUILDKIT=0'}), "
            f"server {docker.out('version', '--format', '{{.Server.Version}}')}"
        )
        try:
            yield docker
        finally:
            if proc is not None:
                _stop_daemon(proc)
                log(f"stopped the dockerd this session started (pid {proc.pid})")


# --------------------------------------------------------------------------- host settings


def bentofile_base_image(bentofile: Path = BENTOFILE) -> str:
    import yaml

    image = ((yaml.safe_load(bentofile.read_text()) or {}).get("docker") or {}).get("base_image")
    if not image:
        raise SystemExit(f"{bentofile} has no docker.base_image")
    return image


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields:
            yield fields


def host_debian_sources(suite: str = SUITE) -> list[tuple[str, str, str]]:
    """(uri, suite, components) of the host's Debian entries for `suite`, `suite`-updates and
    `suite`-security, from /etc/apt/sources.list and /etc/apt/sources.list.d/*.{list,sources}."""
    entries: list[tuple[str, str, str]] = []
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()  # drop [options]
            if len(words) >= 4 and words[0] == "deb" and words[2] in wanted:
                entries.append((words[1], words[2], " ".join(words[3:])))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in _deb822_stanzas(path.read_text(errors="replace")):
            if "deb" not in stanza.get("types", "").split() or stanza.get("enabled", "yes") == "no":
                continue
            for uri in stanza.get("uris", "").split():
                for name in stanza.get("suites", "").split():
                    if name in wanted:
                        entries.append((uri, name, stanza.get("components", "main")))
    unique = list(dict.fromkeys(entries))
    if not any(s == suite for _, s, _ in unique):
        unique.insert(0, (DEFAULT_MIRROR, suite, "main"))
    return unique


def host_apt_acquire() -> str:
    """The host's apt proxy and Release-date settings, as an apt.conf fragment."""
    try:
        dump = subprocess.run(
            ["apt-config", "dump"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    keep = re.compile(r"^Acquire::(https?::Proxy|Check-Valid-Until|Check-Date|Retries)(::[^ ]+)? ")
    return "".join(line + "\n" for line in dump.splitlines() if keep.match(line))


def host_pip_index() -> dict[str, str]:
    """The host's pip index settings (http/https only: file:// and find-links paths are not
    visible inside a build) as environment variables for pip and uv."""
    values: dict[str, list[str]] = {"index-url": [], "extra-index-url": []}
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    for line in listing.splitlines():
        match = re.match(r"^[^.]*\.(index-url|extra-index-url)='(.*)'$", line.strip())
        if match:
            values[match.group(1)].extend(match.group(2).split())
    for key, env_name in (
        ("index-url", "PIP_INDEX_URL"),
        ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
    ):
        values[key].extend(os.environ.get(env_name, "").split())
    web = {
        k: list(dict.fromkeys(u for u in v if u.startswith(("http://", "https://"))))
        for k, v in values.items()
    }
    env: dict[str, str] = {}
    if web["index-url"]:
        env["PIP_INDEX_URL"] = env["UV_INDEX_URL"] = web["index-url"][-1]
    if web["extra-index-url"]:
        env["PIP_EXTRA_INDEX_URL"] = env["UV_EXTRA_INDEX_URL"] = " ".join(web["extra-index-url"])
    return env


def host_extra_ca_certificates() -> list[Path]:
    """Certificates the host trusts beyond Debian's bundle: /usr/local/share/ca-certificates,
    and a CA bundle that SSL_CERT_FILE, REQUESTS_CA_BUNDLE or PIP_CERT point at when that is
    not the system bundle."""
    found = sorted(
        p for p in Path("/usr/local/share/ca-certificates").rglob("*.crt") if p.is_file()
    )
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT"):
        value = os.environ.get(name)
        if value and Path(value).is_file() and Path(value).resolve() != system.resolve():
            found.append(Path(value))
    return list(dict.fromkeys(found))


# --------------------------------------------------------------------------- base image


@dataclass
class BaseRecipe:
    sources: list[tuple[str, str, str]]
    acquire: str
    pip_env: dict[str, str]
    certificates: list[Path]

    @classmethod
    def from_host(cls) -> BaseRecipe:
        return cls(
            host_debian_sources(),
            host_apt_acquire(),
            host_pip_index(),
            host_extra_ca_certificates(),
        )

    @property
    def mirror(self) -> str:
        return next(uri for uri, suite, _ in self.sources if suite == SUITE)

    def env(self) -> dict[str, str]:
        return {
            "LANG": "C.UTF-8",
            # Debian's python is "externally managed"; BentoML's Dockerfile pip-installs uv.
            "PIP_BREAK_SYSTEM_PACKAGES": "1",
            "PIP_NO_CACHE_DIR": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            # uv uses this Debian python and the system CA store (with the host's extra CAs).
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_NATIVE_TLS": "1",
            "UV_LINK_MODE": "copy",
            "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
            **self.pip_env,
        }

    def key(self) -> str:
        payload = {
            "recipe": BASE_RECIPE_VERSION,
            "suite": SUITE,
            "variant": VARIANT,
            "packages": BASE_PACKAGES,
            "sources": self.sources,
            "acquire": self.acquire,
            "env": self.env(),
            "certificates": sorted(
                hashlib.sha256(p.read_bytes()).hexdigest() for p in self.certificates
            ),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _docker_changes(
    env: dict[str, str],
    labels: dict[str, str],
    user: str = "",
    workdir: str = "",
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    ports: list[str] = (),
) -> list[str]:
    changes = [f"ENV {k}={json.dumps(v)}" for k, v in env.items()]
    changes += [f"LABEL {k}={json.dumps(v)}" for k, v in labels.items()]
    if user:
        changes.append(f"USER {user}")
    if workdir:
        changes.append(f"WORKDIR {workdir}")
    if entrypoint:
        changes.append(f"ENTRYPOINT {json.dumps(entrypoint)}")
    if cmd:
        changes.append(f"CMD {json.dumps(cmd)}")
    changes += [f"EXPOSE {p}" for p in ports]
    return [arg for change in changes for arg in ("--change", change)]


def ensure_base_image(docker: Docker, image: str, rebuild: bool = False) -> dict:
    """Reuse `image` when its label matches the current recipe's key, else build it."""
    recipe = BaseRecipe.from_host()
    key = recipe.key()
    previous = (
        docker.out("image", "inspect", "--format", "{{.Id}}", image)
        if docker.image_exists(image)
        else ""
    )
    if not rebuild and previous:
        have = docker.out(
            "image",
            "inspect",
            "--format",
            f'{{{{ index .Config.Labels "{LABEL}.base-key" }}}}',
            image,
        )
        if have == key:
            size = docker.image_size(image)
            log(f"base image {image} is current (key {key}, {size / 1e6:.0f} MB)")
            return {"image": image, "key": key, "size": size, "built": False, "seconds": 0.0}
        log(f"base image {image} has key {have or 'none'}, recipe is {key}: rebuilding")
    debootstrap = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if os.access("/usr/sbin/debootstrap", os.X_OK) else None
    )
    if debootstrap is None:
        raise EngineUnavailable(
            f"no base image {image} and no debootstrap to make it: "
            "`apt-get install debootstrap` (`make container` does)"
        )
    if os.geteuid() != 0:
        raise EngineUnavailable(f"no base image {image}, and debootstrap needs root")
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="defectflow-rootfs-", dir="/var/tmp"))
    rootfs = work / "rootfs"
    try:
        log(f"debootstrap {VARIANT} {SUITE} from {recipe.mirror} (+ {', '.join(BASE_PACKAGES)})")
        _run(
            [
                debootstrap,
                f"--variant={VARIANT}",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(rootfs),
                recipe.mirror,
            ],
            timeout=1800,
        )
        sources = "".join(
            f"deb {uri} {suite} {components}\n" for uri, suite, components in recipe.sources
        )
        (rootfs / "etc/apt/sources.list").write_text(sources)
        if recipe.acquire:
            (rootfs / "etc/apt/apt.conf.d/99defectflow-host").write_text(recipe.acquire)
        if recipe.certificates:
            target = rootfs / "usr/local/share/ca-certificates/host"
            target.mkdir(parents=True, exist_ok=True)
            for i, cert in enumerate(recipe.certificates):
                shutil.copyfile(cert, target / f"{i:02d}-{cert.stem}.crt")
            _run(["chroot", str(rootfs), "update-ca-certificates"], timeout=300)
        listing = _run(
            ["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${binary:Package}\\n"], timeout=120
        ).stdout.decode()
        record = rootfs / BASE_PACKAGE_LIST.lstrip("/")
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text("".join(sorted(line + "\n" for line in listing.split())))
        for pattern in (
            "var/cache/apt/archives/*.deb",
            "var/cache/apt/*.bin",
            "var/lib/apt/lists/*",
            "usr/share/man/*",
            "usr/share/info/*",
            "usr/share/locale/*/LC_MESSAGES/*.mo",
            "var/log/*.log",
            "var/log/apt/*",
        ):
            for path in rootfs.glob(pattern):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for path in (rootfs / "usr/share/doc").rglob("*"):
            if path.is_file() and path.name != "copyright":
                path.unlink()
        labels = {
            f"{LABEL}.base-key": key,
            f"{LABEL}.built-by": "scripts/container.py",
            f"{LABEL}.base-recipe": f"debootstrap --variant={VARIANT} {SUITE} {recipe.mirror} +{','.join(BASE_PACKAGES)}",
        }
        changes = _docker_changes(recipe.env(), labels, cmd=["/bin/bash"])
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        )
        try:
            imported = subprocess.run(
                [docker.binary, "import", *changes, "-", image],
                stdin=tar.stdout,
                capture_output=True,
                timeout=600,
            )
        finally:
            tar.stdout.close()
            tar.wait(timeout=60)
        if imported.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"docker import failed: {imported.stderr.decode(errors='replace')}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - start
    if previous and previous != docker.out("image", "inspect", "--format", "{{.Id}}", image):
        docker("rmi", previous, check=False)  # the replaced base (flattened images do not use it)
    size = docker.image_size(image)
    log(f"base image {image}: {size / 1e6:.0f} MB, built in {seconds:.0f} s (key {key})")
    return {"image": image, "key": key, "size": size, "built": True, "seconds": seconds}


# --------------------------------------------------------------------------- application image


def _config(docker: Docker, image: str) -> dict:
    return json.loads(docker.out("image", "inspect", "--format", "{{json .Config}}", image))


def slim_and_flatten(docker: Docker, built: str, image: str, labels: dict[str, str]) -> str:
    """Run SLIM_SCRIPT in a container of `built`, then import its file system as `image` with
    the same user, entrypoint, working directory, ports and serving environment."""
    config = _config(docker, built)
    name = f"defectflow-slim-{os.getpid()}-{int(time.time())}"
    try:
        done = docker(
            "run",
            "--name",
            name,
            "--user",
            "root",
            "--network",
            "none",
            "--entrypoint",
            "/bin/sh",
            built,
            "-c",
            SLIM_SCRIPT,
            timeout=900,
        )
        log(done.stdout.decode().strip().splitlines()[-1])
        env = dict(item.split("=", 1) for item in config.get("Env") or [])
        env = {k: v for k, v in env.items() if not k.startswith(BUILD_ONLY_ENV)}
        changes = _docker_changes(
            env,
            {**(config.get("Labels") or {}), **labels},
            user=config.get("User") or "",
            workdir=config.get("WorkingDir") or "",
            entrypoint=config.get("Entrypoint"),
            cmd=config.get("Cmd"),
            ports=sorted(config.get("ExposedPorts") or {}),
        )
        export = subprocess.Popen([docker.binary, "export", name], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                [docker.binary, "import", *changes, "-", image],
                stdin=export.stdout,
                capture_output=True,
                timeout=900,
            )
        finally:
            export.stdout.close()
            export.wait(timeout=120)
        if imported.returncode != 0 or export.returncode != 0:
            raise RuntimeError(
                f"docker export | import failed: {imported.stderr.decode(errors='replace')}"
            )
        return imported.stdout.decode().strip()
    finally:
        docker("rm", "--force", name, check=False)


def build_image(
    docker: Docker,
    bento_tag: str,
    image: str,
    env: dict[str, str] | None = None,
    extra_tags: tuple[str, ...] = (),
    log_file: Path | None = None,
) -> dict:
    """`bentoml containerize` the Bento `bento_tag` (in the BentoML store of `env`), slim and
    flatten it into `image`. Returns the figures."""
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    version = bento_tag.split(":", 1)[1]
    built = f"defectflow-build:{version}"
    model_tag = _bento_model(bento_tag, env)
    start = time.monotonic()
    cmd = [bentoml, "containerize", bento_tag, "-t", built, "--opt", "network=host"]
    log(f"{shlex.join(cmd)}" + (f" (log {log_file})" if log_file else ""))
    out = log_file.open("wb") if log_file else None
    try:
        done = subprocess.run(
            cmd,
            env=docker.env(env),
            stdout=out or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=3600,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError("bentoml containerize did not finish within 3600 s") from None
    finally:
        if out:
            out.close()
    if done.returncode != 0:
        text = (
            log_file.read_text(errors="replace")
            if log_file
            else done.stdout.decode(errors="replace")
        )
        raise RuntimeError(f"bentoml containerize failed ({done.returncode}):\n{text[-6000:]}")
    containerized = time.monotonic() - start
    built_size = docker.image_size(built)
    labels = {
        f"{LABEL}.bento": bento_tag,
        f"{LABEL}.model": model_tag,
        f"{LABEL}.built-by": "scripts/container.py",
        "org.opencontainers.image.title": "defectflow",
        "org.opencontainers.image.description": "defectflow visual defect inspection (BentoML): POST /predict",
    }
    try:
        slim_and_flatten(docker, built, image, labels)
    finally:
        docker("rmi", "--no-prune", built, check=False)  # BuildKit's layer cache stays
    for tag in extra_tags:
        docker("tag", image, tag)
    seconds = time.monotonic() - start
    size = docker.image_size(image)
    log(
        f"image {image}: {size / 1e6:.0f} MB (containerize {containerized:.0f} s -> {built_size / 1e6:.0f} MB; "
        f"slimmed and flattened: {seconds:.0f} s in all)"
    )
    return {
        "image": image,
        "size": size,
        "containerize_size": built_size,
        "containerize_seconds": containerized,
        "seconds": seconds,
        "model": model_tag,
    }


def _bento_model(bento_tag: str, env: dict[str, str] | None) -> str:
    """The model tag a Bento pins (its bento.yaml), read without importing BentoML here."""
    import yaml

    home = Path((env or os.environ).get("BENTOML_HOME", Path.home() / "bentoml"))
    name, version = bento_tag.split(":", 1)
    info = yaml.safe_load((home / "bentos" / name / version / "bento.yaml").read_text())
    models = [m["tag"] for s in info.get("services") or [] for m in s.get("models") or []]
    return (info.get("args") or {}).get("model_tag") or (models[0] if models else "")


# --------------------------------------------------------------------------- training image

#: The training image: the project and its pinned training dependencies on the same base.
TRAIN_REPOSITORY = "defectflow-train"
#: Where the project lies in the training image (installed editable: the Bento build of a
#: promotion uses its bentofile.yaml and service.py, as a checkout's).
TRAIN_PROJECT_DIR = "/opt/defectflow"
TRAIN_VENV = "/opt/venv"
#: The image's default user (flow-run containers run as the data dir's owner, see stack.py).
TRAIN_USER, TRAIN_UID = "defectflow", 1000
#: Extras per variant: `cpu` (tensorflow-cpu) is built here; `gpu` (tensorflow[and-cuda]) is
#: the same recipe with the CUDA wheels, for a machine with an NVIDIA driver and the NVIDIA
#: container toolkit (docs/deployment-stack.md).
TRAIN_EXTRAS = {"cpu": ("cpu", "docker"), "gpu": ("gpu", "docker")}
#: What the image holds of the checkout (nothing else: no tests, no data, no .defectflow).
TRAIN_CONTEXT = (
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "src",
    "flows",
    "tasks",
    "configs",
    "expectations",
    "service.py",
    "bentofile.yaml",
    "prefect.yaml",
)

TRAIN_DOCKERFILE = """\
FROM {base}
USER root
RUN useradd --create-home --uid {uid} --shell /bin/bash {user} \\
 && python3 -m venv {venv}
ENV PATH={venv}/bin:$PATH \\
    VIRTUAL_ENV={venv} \\
    PYTHONDONTWRITEBYTECODE=1 \\
    TF_CPP_MIN_LOG_LEVEL=2 \\
    KERAS_BACKEND=tensorflow \\
    DO_NOT_TRACK=1 \\
    BENTOML_DO_NOT_TRACK=true \\
    PREFECT_SERVER_ANALYTICS_ENABLED=false
# The pinned dependencies first: a change of the code alone reuses this layer.
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --upgrade pip \\
 && pip install --no-cache-dir -r /tmp/requirements.txt \\
 && rm /tmp/requirements.txt
COPY project {project}
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e {project} \\
 && python -m compileall -q {project}/src {project}/flows {project}/tasks > /dev/null \\
 && python -c "import defectflow.orchestration.flows.training, defectflow.orchestration.flows.nightly, prefect_docker, tensorflow" \\
 && rm -rf /root/.cache /root/.prefect /root/.keras /root/.config /tmp/*
WORKDIR {project}
USER {user}
CMD ["defectflow", "--help"]
"""


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def train_requirements(variant: str = "cpu") -> list[str]:
    """The pinned requirements of the training image: the project's dependencies and the
    extras of `variant`, as pyproject.toml pins them (the build resolves nothing else)."""
    if variant not in TRAIN_EXTRAS:
        raise ValueError(f"variant {variant!r}: choose one of {sorted(TRAIN_EXTRAS)}")
    project = _pyproject()["project"]
    extras = project.get("optional-dependencies", {})
    missing = [name for name in TRAIN_EXTRAS[variant] if name not in extras]
    if missing:
        raise ValueError(f"pyproject.toml has no extra {', '.join(missing)}")
    requirements = list(project["dependencies"])
    for name in TRAIN_EXTRAS[variant]:
        requirements += extras[name]
    # Build requirements of the editable install (--no-build-isolation), pinned by the build system.
    requirements += _pyproject()["build-system"]["requires"]
    return list(dict.fromkeys(requirements))


def train_image_tag(variant: str = "cpu") -> str:
    from defectflow import __version__

    return f"{TRAIN_REPOSITORY}:{__version__}" + ("" if variant == "cpu" else f"-{variant}")


def _train_context(target: Path, variant: str, base: str) -> None:
    """The build context: Dockerfile, requirements.txt and project/ (TRAIN_CONTEXT and the Data
    Docs' vendored files that `make install` fetched with npm, which data validation copies)."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "Dockerfile").write_text(
        TRAIN_DOCKERFILE.format(
            base=base,
            uid=TRAIN_UID,
            user=TRAIN_USER,
            venv=TRAIN_VENV,
            project=TRAIN_PROJECT_DIR,
        )
    )
    (target / "requirements.txt").write_text("\n".join(train_requirements(variant)) + "\n")
    project = target / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in TRAIN_CONTEXT:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=ignore)
        else:
            project.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, project / name)
    from defectflow.data.data_docs_assets import CDN_ASSETS, NODE_MODULES

    for package, path in set(CDN_ASSETS.values()):
        source = NODE_MODULES / package / path
        if not source.is_file():
            raise RuntimeError(
                f"{source} is missing: run `make install` (npm ci in data-docs-assets/) first"
            )
        copy = project / "data-docs-assets" / "node_modules" / package / path
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, copy)
        license_file = NODE_MODULES / package / "LICENSE"
        if license_file.is_file():
            shutil.copy2(license_file, project / "data-docs-assets" / "node_modules" / package)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def train_source_digest(variant: str = "cpu", base: str | None = None) -> str:
    """A digest of what the training image of `variant` is built from (Dockerfile,
    requirements, the project's files): its label `org.defectflow.source`."""
    with tempfile.TemporaryDirectory(prefix="defectflow-train-") as tmp:
        _train_context(Path(tmp), variant, base or bentofile_base_image())
        return _tree_digest(Path(tmp))


def build_train_image(
    docker: Docker, variant: str = "cpu", log_file: Path | None = None, latest: bool = True
) -> dict:
    """The training image of `variant` on the local base image (built first when missing):
    `defectflow-train:<version>` and, for cpu, `defectflow-train:latest`. Returns the figures."""
    base = ensure_base_image(docker, bentofile_base_image())
    image = train_image_tag(variant)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="defectflow-train-") as tmp:
        context = Path(tmp)
        _train_context(context, variant, base["image"])
        labels = {
            f"{LABEL}.built-by": "scripts/container.py",
            f"{LABEL}.source": _tree_digest(context),
            f"{LABEL}.variant": variant,
            "org.opencontainers.image.title": "defectflow training",
            "org.opencontainers.image.description": "defectflow pipeline, flows and Prefect worker (prefect-docker)",
        }
        tags = [image]
        if latest and variant == "cpu":
            tags.append(f"{TRAIN_REPOSITORY}:latest")
        _docker_build(docker, context, tags, labels, log_file)
    seconds = time.monotonic() - start
    size = docker.image_size(image)
    log(f"training image {image}: {size / 1e6:.0f} MB, built in {seconds:.0f} s")
    return {"image": image, "size": size, "seconds": seconds, "base": base, "variant": variant}


# --------------------------------------------------------------------------- postgres image

#: PostgreSQL of the compose stack: Debian's postgresql on the same local base (no registry).
POSTGRES_IMAGE = "defectflow-postgres:15"
POSTGRES_DOCKERFILE = """\
FROM {base}
USER root
RUN apt-get update -q \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15 \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \\
 && mkdir -p /var/lib/postgresql/data /run/postgresql \\
 && chown -R postgres:postgres /var/lib/postgresql /run/postgresql
COPY entrypoint.sh /usr/local/bin/defectflow-postgres
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
ENTRYPOINT ["/bin/sh", "/usr/local/bin/defectflow-postgres"]
"""
#: First start: initdb with POSTGRES_USER / POSTGRES_PASSWORD (scram-sha-256) and the database
#: POSTGRES_DB; then postgres in the foreground, listening on the container's network.
POSTGRES_ENTRYPOINT = """\
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
user="${POSTGRES_USER:-prefect}"
db="${POSTGRES_DB:-prefect}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  umask 077
  printf '%s\\n' "$POSTGRES_PASSWORD" > /tmp/pwfile
  initdb -D "$PGDATA" --username "$user" --pwfile /tmp/pwfile --auth scram-sha-256 \\
    --encoding UTF8 --locale C > /dev/null
  rm -f /tmp/pwfile
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start > /dev/null
  PGPASSWORD="$POSTGRES_PASSWORD" psql -v ON_ERROR_STOP=1 -h /run/postgresql -U "$user" -d postgres \\
    -c "CREATE DATABASE \\"$db\\"" > /dev/null
  pg_ctl -D "$PGDATA" -m fast -w stop > /dev/null
  echo "initialised $PGDATA (user $user, database $db)"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/run/postgresql
"""


def build_postgres_image(docker: Docker, log_file: Path | None = None) -> dict:
    """The compose stack's PostgreSQL image on the local base (built first when missing)."""
    base = ensure_base_image(docker, bentofile_base_image())
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="defectflow-postgres-") as tmp:
        (Path(tmp) / "Dockerfile").write_text(POSTGRES_DOCKERFILE.format(base=base["image"]))
        (Path(tmp) / "entrypoint.sh").write_text(POSTGRES_ENTRYPOINT)
        _docker_build(
            docker,
            Path(tmp),
            [POSTGRES_IMAGE],
            {f"{LABEL}.built-by": "scripts/container.py", f"{LABEL}.base-key": base["key"]},
            log_file,
        )
    size = docker.image_size(POSTGRES_IMAGE)
    seconds = time.monotonic() - start
    log(f"PostgreSQL image {POSTGRES_IMAGE}: {size / 1e6:.0f} MB, built in {seconds:.0f} s")
    return {"image": POSTGRES_IMAGE, "size": size, "seconds": seconds}


def _docker_build(
    docker: Docker, context: Path, tags: list[str], labels: dict[str, str], log_file: Path | None
) -> None:
    """`docker build --network host` of `context` (RUN steps reach the host's mirrors)."""
    cmd = ["build", "--network", "host"]
    for tag in tags:
        cmd += ["--tag", tag]
    for key, value in labels.items():
        cmd += ["--label", f"{key}={value}"]
    cmd.append(str(context))
    log(f"docker {shlex.join(cmd)}" + (f" (log {log_file})" if log_file else ""))
    out = log_file.open("wb") if log_file else None
    try:
        done = subprocess.run(
            [docker.binary, *cmd],
            env=docker.env(),
            stdout=out or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=3600,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"docker build of {tags[0]} took over 3600 s") from None
    finally:
        if out:
            out.close()
    if done.returncode != 0:
        text = (
            log_file.read_text(errors="replace")
            if log_file
            else done.stdout.decode(errors="replace")
        )
        raise RuntimeError(f"docker build of {tags[0]} failed:\n{text[-6000:]}")


# --------------------------------------------------------------------------- running it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(
    method: str,
    url: str,
    timeout: float,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_image(
    url: str, png: bytes, filename: str = "part.png", timeout: float = 60
) -> tuple[int, bytes]:
    boundary = f"defectflow{os.urandom(8).hex()}"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return _http(
        "POST",
        f"{url}/predict",
        timeout,
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )


@dataclass
class Running:
    name: str
    url: str
    ready_seconds: float


@contextlib.contextmanager
def run_container(docker: Docker, image: str, ready_timeout: float = 240) -> Iterator[Running]:
    """`docker run` the image on a free 127.0.0.1 port until /readyz answers; always removed."""
    port = free_port()
    name = f"defectflow-run-{os.getpid()}-{port}"
    start = time.monotonic()
    docker(
        "run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:3000", image, timeout=120
    )
    try:
        url = f"http://127.0.0.1:{port}"
        checked = 0.0
        while True:
            try:
                if _http("GET", f"{url}/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            now = time.monotonic()
            if now - checked > 2:
                checked = now
                if docker.out("inspect", "--format", "{{.State.Running}}", name) != "true":
                    logs = docker("logs", "--tail", "60", name, check=False)
                    raise RuntimeError(
                        f"container {name} exited:\n{logs.stdout.decode()}{logs.stderr.decode()}"
                    )
            if now - start > ready_timeout:
                logs = docker("logs", "--tail", "60", name, check=False)
                raise RuntimeError(
                    f"{url}/readyz did not answer within {ready_timeout:.0f} s:\n"
                    f"{logs.stdout.decode()}{logs.stderr.decode()}"
                )
            time.sleep(0.25)
        yield Running(name, url, time.monotonic() - start)
    finally:
        docker("rm", "--force", name, check=False, timeout=120)


def process_user(docker: Docker, name: str) -> dict:
    """The uid of `docker exec` and of the container's main process (the BentoML server)."""
    exec_uid = int(docker.out("exec", name, "id", "-u"))
    status = docker.out("exec", name, "cat", "/proc/1/status")
    main_uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    user = docker.out("exec", name, "id", "-un")
    return {"exec_uid": exec_uid, "main_uid": main_uid, "user": user}


def sample_png() -> tuple[bytes, str]:
    home = Path(os.environ.get("DEFECTFLOW_HOME", REPO_ROOT / ".defectflow"))
    samples = sorted((home / "data/synthetic/capsule/test/crack").glob("*.png"))
    if samples:
        return samples[0].read_bytes(), str(samples[0])
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(
        ".png", np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    )
    return buf.tobytes(), "a generated 128x96 noise PNG"


def answer_problems(answer: dict, height: int, width: int) -> list[str]:
    """What is wrong with a /predict answer for an image of `height` x `width` (empty: nothing):
    a class among the probabilities' (or unknown_defect), probabilities summing to 1, a binary
    mask PNG at the image's size, and an anomaly score."""
    import cv2
    import numpy as np

    problems = []
    missing = {"class", "probabilities", "mask_png_base64", "mask_size", "anomaly_score"} - set(
        answer
    )
    if missing:
        return [f"no {', '.join(sorted(missing))}"]
    probabilities = answer["probabilities"]
    if answer["class"] not in (*probabilities, "unknown_defect"):
        problems.append(f"class {answer['class']!r} is none of {sorted(probabilities)}")
    if abs(sum(probabilities.values()) - 1.0) > 1e-4:
        problems.append(f"probabilities sum to {sum(probabilities.values())}")
    try:
        mask = cv2.imdecode(
            np.frombuffer(base64.b64decode(answer["mask_png_base64"], validate=True), np.uint8),
            cv2.IMREAD_UNCHANGED,
        )
    except ValueError as exc:
        mask, problems = None, [*problems, f"mask is not base64: {exc}"]
    if mask is None or mask.shape != (height, width) or not set(np.unique(mask)) <= {0, 255}:
        problems.append(
            f"mask is not a binary {width}x{height} PNG: {None if mask is None else mask.shape}"
        )
    if answer["mask_size"] != [width, height]:
        problems.append(f"mask_size {answer['mask_size']} for a {width}x{height} image")
    if not isinstance(answer["anomaly_score"], float):
        problems.append(
            f"anomaly_score {answer['anomaly_score']!r} (the default model has an anomaly head)"
        )
    return problems


def smoke_test(docker: Docker, image: str, png: bytes, requests: int = 10) -> dict:
    """Run `image`, check /readyz, /predict (200 JSON with class, probabilities summing to 1,
    mask at the image's size, anomaly score) and that the server does not run as root.
    Returns the figures and the first answer."""
    with run_container(docker, image) as running:
        latencies = []
        answer: dict = {}
        for i in range(requests):
            start = time.monotonic()
            status, body = post_image(running.url, png)
            latencies.append(time.monotonic() - start)
            if status != 200:
                raise RuntimeError(f"POST /predict answered {status}: {body[:500]!r}")
            if i == 0:
                answer = json.loads(body)
        import cv2
        import numpy as np

        height, width = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]
        problems = answer_problems(answer, height, width)
        if problems:
            raise RuntimeError(f"/predict answered 200 but {'; '.join(problems)}")
        users = process_user(docker, running.name)
        if users["exec_uid"] == 0 or users["main_uid"] == 0:
            raise RuntimeError(f"the service runs as root in {image}: {users}")
        return {
            "ready_seconds": running.ready_seconds,
            "answer": answer,
            **users,
            "first_ms": 1000 * latencies[0],
            "median_ms": 1000 * statistics.median(latencies[1:] or latencies),
        }


# --------------------------------------------------------------------------- commands


def ensure_host_packages() -> None:
    """Debian's docker.io and debootstrap (installed when missing and this is root with apt)."""
    missing = [
        pkg
        for pkg, binary in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
        if not (shutil.which(binary) or os.access(f"/usr/sbin/{binary}", os.X_OK))
    ]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(
            f"missing {', '.join(missing)}: install them (Debian: apt-get install {' '.join(missing)})"
        )
    log(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], timeout=900, env=env, capture=False)
    _run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        timeout=1800,
        env=env,
        capture=False,
    )


def _state_dir() -> Path:
    return Path(os.environ.get("DEFECTFLOW_HOME", REPO_ROOT / ".defectflow")) / "container"


def production_bento() -> str:
    """A fresh Bento of the registry's production model (offline, a few seconds)."""
    from defectflow.environment import configure_environment

    configure_environment()
    from defectflow import registry

    tag = registry.production_tag()
    if tag is None:
        raise SystemExit(
            "no production model in the registry: run `make demo` first "
            "(or `defectflow models promote TAG`)"
        )
    bento = registry.build_bento(tag, BENTOFILE, REPO_ROOT)
    log(f"built Bento {bento} for the production model {tag}")
    return bento


def cmd_base_image(args: argparse.Namespace) -> None:
    ensure_host_packages()
    with engine(_state_dir()) as docker:
        ensure_base_image(docker, bentofile_base_image(), rebuild=args.rebuild)


def _build(docker: Docker) -> dict:
    base = ensure_base_image(docker, bentofile_base_image())
    bento = production_bento()
    image = f"defectflow:{bento.split(':', 1)[1]}"
    state = _state_dir()
    state.mkdir(parents=True, exist_ok=True)
    figures = build_image(
        docker, bento, image, extra_tags=("defectflow:latest",), log_file=state / "containerize.log"
    )
    figures["base"] = base
    prune_old_images(docker, "defectflow", keep=KEEP_IMAGES)
    (state / "build.json").write_text(json.dumps(figures, indent=2, default=str))
    return figures


def prune_old_images(docker: Docker, repository: str, keep: int) -> None:
    """Remove all but the `keep` newest images of `repository` this script made."""
    rows = docker.out(
        "image",
        "ls",
        repository,
        "--filter",
        f"label={LABEL}.built-by",
        "--format",
        "{{.ID}} {{.Tag}} {{.CreatedAt}}",
    ).splitlines()
    newest: dict[str, str] = {}
    for row in rows:  # one row per tag; an image is as old as its creation
        image_id, _tag, created = row.split(" ", 2)
        newest[image_id] = created
    for image_id in sorted(newest, key=newest.get, reverse=True)[keep:]:
        docker("rmi", "--force", image_id, check=False)
        log(f"removed the older image {image_id} of {repository}")


def cmd_build(args: argparse.Namespace) -> None:
    ensure_host_packages()
    with engine(_state_dir()) as docker:
        figures = _build(docker)
    print(
        f"\nimage {figures['image']} (also defectflow:latest): {figures['size'] / 1e6:.0f} MB "
        f"(base {figures['base']['size'] / 1e6:.0f} MB; bentoml containerize alone "
        f"{figures['containerize_size'] / 1e6:.0f} MB); built in {figures['seconds']:.0f} s\n"
        "run it:  docker run -d --name defectflow --restart unless-stopped -p 3000:3000 defectflow:latest"
    )


def cmd_test(args: argparse.Namespace) -> None:
    ensure_host_packages()
    with engine(_state_dir()) as docker:
        image = "defectflow:latest"
        wanted = None
        with contextlib.suppress(Exception):
            from defectflow.environment import configure_environment

            configure_environment()
            from defectflow import registry

            wanted = registry.production_tag()
        have = (
            docker.out(
                "image",
                "inspect",
                "--format",
                f'{{{{ index .Config.Labels "{LABEL}.model" }}}}',
                image,
            )
            if docker.image_exists(image)
            else None
        )
        if have is None or (wanted and have != wanted):
            log(
                f"{image} {'is missing' if have is None else f'serves {have}, production is {wanted}'}: building it"
            )
            _build(docker)
        png, source = sample_png()
        log(f"POST /predict with {source}")
        figures = smoke_test(docker, image, png)
    answer = dict(figures.pop("answer"))
    answer["mask_png_base64"] = (
        answer["mask_png_base64"][:40] + f"... ({len(answer['mask_png_base64'])} chars)"
    )
    print(json.dumps(answer, indent=2))
    print(
        f"\n{image}: POST /predict answered 200 with class {answer['class']!r}, probabilities summing to "
        f"{sum(answer['probabilities'].values()):.4f}, a {answer['mask_size'][0]}x{answer['mask_size'][1]} mask "
        f"and anomaly score {answer['anomaly_score']}"
    )
    print(
        f"{image}: ready {figures['ready_seconds']:.1f} s after docker run; POST /predict first "
        f"{figures['first_ms']:.0f} ms, median {figures['median_ms']:.0f} ms; the server runs as "
        f"{figures['user']} (uid {figures['main_uid']}), not root"
    )


def cmd_train_image(args: argparse.Namespace) -> None:
    ensure_host_packages()
    state = _state_dir()
    state.mkdir(parents=True, exist_ok=True)
    with engine(state) as docker:
        figures = build_train_image(
            docker, args.variant, log_file=state / f"train-image-{args.variant}.log"
        )
        user = docker.out("run", "--rm", "--network", "none", figures["image"], "id", "-un")
        if user != TRAIN_USER:
            raise RuntimeError(f"{figures['image']} runs as {user!r}, not {TRAIN_USER}")
    (state / f"train-image-{args.variant}.json").write_text(
        json.dumps(figures, indent=2, default=str)
    )
    print(
        f"\nimage {figures['image']}: {figures['size'] / 1e6:.0f} MB (base "
        f"{figures['base']['size'] / 1e6:.0f} MB), built in {figures['seconds']:.0f} s; user {user}"
    )


def cmd_clean(args: argparse.Namespace) -> None:
    with engine(_state_dir()) as docker:
        removed: set[str] = set()
        for _ in range(5):  # tagged images first, then what is left: a legacy build's layers
            ids = docker.out(
                "image", "ls", "--all", "--quiet", "--filter", f"label={LABEL}.built-by"
            ).split()
            if not ids:
                break
            for image_id in dict.fromkeys(ids):
                if docker("rmi", "--force", image_id, check=False).returncode == 0:
                    removed.add(image_id)
        log(
            f"removed {len(removed)} image(s) made by scripts/container.py and their build layers "
            "(BuildKit's cache stays: `docker builder prune` empties it)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base-image", help="make (or confirm) the local Debian base image")
    base.add_argument("--rebuild", action="store_true")
    base.set_defaults(func=cmd_base_image)
    sub.add_parser("build", help="image of the production model's Bento").set_defaults(
        func=cmd_build
    )
    sub.add_parser("test", help="run the image, call /readyz and /predict").set_defaults(
        func=cmd_test
    )
    train = sub.add_parser(
        "train-image", help="the training image (project, training dependencies, worker)"
    )
    train.add_argument(
        "--variant",
        choices=sorted(TRAIN_EXTRAS),
        default="cpu",
        help="cpu: tensorflow-cpu (default); gpu: tensorflow[and-cuda], for a GPU machine",
    )
    train.set_defaults(func=cmd_train_image)
    sub.add_parser("clean", help="remove the images this script made").set_defaults(func=cmd_clean)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except EngineUnavailable as exc:
        print(f"container engine unavailable: {exc}", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
