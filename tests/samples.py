"""Sample inputs several test modules read: apt source files of a Debian machine."""

from __future__ import annotations

DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://deb.example.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.example.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://already.example.org/debian
Suites: bookworm
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example.org/debian
Suites: bookworm
Components: main
"""

# What DEB822's enabled `deb` stanzas become as `deb-src` entries.
DEB822_SRC = (
    "Types: deb-src\n"
    "URIs: http://deb.example.org/debian\n"
    "Suites: bookworm bookworm-updates\n"
    "Components: main\n"
    "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    "\n"
    "Types: deb-src\n"
    "URIs: http://deb.example.org/debian-security\n"
    "Suites: bookworm-security\n"
    "Components: main\n"
    "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
)
