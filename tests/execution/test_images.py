"""Mirror choice (`images.apt_mirror`) and image plumbing (no Docker needed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import docker.errors
import pytest

from orchestrator.errors import LfsorchError
from orchestrator.execution import images
from orchestrator.workspace import Workspace
from tests.helpers import apt_root
from tests.samples import DEB822

ONE_LINE = """\
# deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_]/ bookworm main
deb-src http://src.example.org/debian bookworm main
deb [arch=amd64 signed-by=/etc/k.gpg] http://ftp.example.org/debian/ bookworm main contrib
deb http://security.example.org/debian-security bookworm-security main
"""


def test_pick_mirror_takes_the_first_main_suite() -> None:
    pairs = [
        ("http://deb.example.org/debian", "bookworm-updates"),
        ("http://security.example.org/debian-security", "bookworm-security"),
        ("http://old.example.org/debian", "bookworm/updates"),
        ("http://ftp.example.org/debian", "bookworm"),
        ("http://later.example.org/debian", "trixie"),
    ]
    assert images.pick_mirror(pairs) == ("http://ftp.example.org/debian", "bookworm")


def test_only_update_suites_and_cdrom_are_not_a_mirror() -> None:
    pairs = [
        ("http://deb.example.org/debian", "bookworm-updates"),
        ("cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_]", "bookworm"),
    ]
    with pytest.raises(images.MirrorNotFound) as caught:
        images.pick_mirror(pairs)
    assert isinstance(caught.value, LfsorchError)
    assert "--mirror" in str(caught.value)


def test_apt_mirror_reads_sources_d(tmp_path: Path) -> None:
    root = apt_root(tmp_path, {"sources.list": "", "sources.list.d/debian.sources": DEB822})
    assert images.apt_mirror(root) == ("http://deb.example.org/debian", "bookworm")


def test_apt_mirror_prefers_sources_list_first(tmp_path: Path) -> None:
    root = apt_root(tmp_path, {"sources.list": ONE_LINE, "sources.list.d/debian.sources": DEB822})
    assert images.apt_mirror(root) == ("http://ftp.example.org/debian", "bookworm")


def test_apt_mirror_skips_disabled_source_only_and_cdrom(tmp_path: Path) -> None:
    root = apt_root(
        tmp_path,
        {
            "sources.list": "deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_]/ bookworm main\n",
            "sources.list.d/a.sources": (
                "Types: deb-src\nURIs: http://src.example.org/debian\nSuites: bookworm\n\n"
                "Enabled: no\nTypes: deb\nURIs: http://off.example.org/debian\nSuites: bookworm\n"
            ),
            "sources.list.d/b.sources": (
                "Types: deb deb-src\nURIs:\n http://on.example.org/debian/\nSuites: trixie\n"
            ),
        },
    )
    assert images.apt_mirror(root) == ("http://on.example.org/debian", "trixie")


def test_apt_mirror_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(images.MirrorNotFound, match="no Debian mirror found"):
        images.apt_mirror(tmp_path)


def test_bootstrap_without_debootstrap_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(images.shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(images.BootstrapFailed) as caught:
        images.bootstrap_base(object(), Workspace(tmp_path))  # type: ignore[arg-type]
    assert caught.value.hint == "apt-get install debootstrap"


def test_images_root_override_must_hold_host_dockerfile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(images.IMAGES_ENV, str(tmp_path))
    with pytest.raises(LfsorchError, match="host/Dockerfile"):
        images.images_root()


def test_checkout_ships_host_image_definition() -> None:
    root = images.images_root()
    assert (root / "host" / "version-check.sh").is_file()


class _FakeImages:
    """Just enough of `client.images` for ensure_base's three paths."""

    def __init__(self, present: bool, pull_works: bool) -> None:
        self.present, self.pull_works, self.tagged = present, pull_works, ""

    def get(self, ref: str) -> object:
        if not self.present:
            raise docker.errors.ImageNotFound(ref)
        return SimpleNamespace(id="sha256:present")

    def pull(self, repository: str, tag: str) -> object:
        if not self.pull_works:
            raise docker.errors.APIError("dial tcp: lookup registry-1.docker.io: no such host")
        return SimpleNamespace(id="sha256:pulled", tag=self._tag)

    def _tag(self, repository: str, tag: str) -> None:
        self.tagged = f"{repository}:{tag}"


@pytest.mark.parametrize(
    ("present", "pull_works", "expected", "said"),
    [
        (True, False, "sha256:present", "is present"),
        (False, True, "sha256:pulled", "pulled debian:bookworm"),
        (False, False, "sha256:bootstrapped", "bootstrapping"),
    ],
)
def test_ensure_base_says_which_path_it_took(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    present: bool,
    pull_works: bool,
    expected: str,
    said: str,
) -> None:
    fake = _FakeImages(present, pull_works)
    monkeypatch.setattr(images, "bootstrap_base", lambda *_a, **_k: "sha256:bootstrapped")
    lines: list[str] = []
    client = SimpleNamespace(images=fake)

    got = images.ensure_base(client, Workspace(tmp_path), progress=lines.append)  # type: ignore[arg-type]

    assert got == expected
    assert any(said in line for line in lines), lines
    assert fake.tagged == (images.BASE_IMAGE if expected == "sha256:pulled" else "")
