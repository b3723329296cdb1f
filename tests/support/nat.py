"""A namespace topology of homes behind NAT routers, for the overlay tests and bench.

root ns: 203.0.113.1 (the coordinator's "public" address) ──┐
"internet" ns: a bridge ────────────────────────────────────┤
  ├── router r1 (203.0.113.11, masquerade)             ── supplier s1 192.168.71.2
  ├── router r2 (203.0.113.12, masquerade)             ── supplier s2 192.168.72.2
  └── router r3 (203.0.113.13, masquerade fully-random: a symmetric NAT) ── s3

Each router is a home router: masquerade, and nothing on its WAN side reaches the router
itself unless it answers something sent from inside (input chain: drop). That matters for
hole punching. A router that accepted unsolicited input (the first version of this
topology) confirms a conntrack entry for the peer's first, unanswered packet; its own
member's punch back to that peer then clashes with that entry and leaves on a random
port, so two Linux NATs could never be punched through (only a relay worked).
"""

from __future__ import annotations

import secrets
import subprocess

COORD_IP = "203.0.113.1"
SYMMETRIC = 3


def sh(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr}")
    return done.stdout


class Topology:
    def __init__(self, public: str = "203.0.113") -> None:
        #: The "internet"'s /24 (another one lets two topologies coexist on one machine).
        self.public = public
        #: The coordinator's public address (in the root namespace).
        self.coord_ip = f"{public}.1"
        self.tag = secrets.token_hex(2)
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.inet = self._ns("inet")
        self.suppliers: dict[int, str] = {}
        self.user = ""

    def _ns(self, kind: str) -> str:
        name = f"lt-{self.tag}-{kind}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def build(self) -> Topology:
        inet = ["ip", "-n", self.inet]
        sh(*inet, "link", "add", "br0", "type", "bridge")
        sh(*inet, "link", "set", "br0", "up")
        # The coordinator's "public" address, in the root namespace.
        root_if = f"ltc{self.tag}"
        sh(
            "ip",
            "link",
            "add",
            root_if,
            "type",
            "veth",
            "peer",
            "name",
            "coord",
            "netns",
            self.inet,
        )
        self.links.append(root_if)
        sh("ip", "addr", "add", f"{self.coord_ip}/24", "dev", root_if)
        sh("ip", "link", "set", root_if, "up")
        sh(*inet, "link", "set", "coord", "master", "br0")
        sh(*inet, "link", "set", "coord", "up")
        for i in (1, 2, 3, 4):
            router, supplier = self._ns(f"r{i}"), self._ns(f"s{i}" if i < 4 else "user")
            r, s = ["ip", "-n", router], ["ip", "-n", supplier]
            sh(
                *inet,
                "link",
                "add",
                f"w{i}",
                "type",
                "veth",
                "peer",
                "name",
                "wan",
                "netns",
                router,
            )
            sh(*inet, "link", "set", f"w{i}", "master", "br0")
            sh(*inet, "link", "set", f"w{i}", "up")
            sh(*r, "addr", "add", f"{self.public}.{10 + i}/24", "dev", "wan")
            sh(*r, "link", "set", "wan", "up")
            sh(*r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", supplier)
            sh(*r, "addr", "add", f"192.168.{70 + i}.1/24", "dev", "lan")
            sh(*r, "link", "set", "lan", "up")
            sh(*s, "addr", "add", f"192.168.{70 + i}.2/24", "dev", "eth0")
            sh(*s, "link", "set", "eth0", "up")
            sh(*s, "route", "add", "default", "via", f"192.168.{70 + i}.1")
            sh("nsenter", f"--net=/run/netns/{router}", "sysctl", "-qw", "net.ipv4.ip_forward=1")
            random = " fully-random" if i == SYMMETRIC else ""
            sh(
                "nsenter",
                f"--net=/run/netns/{router}",
                "nft",
                "-f",
                "-",
                stdin=(
                    "table ip nat {\n chain post {\n"
                    "  type nat hook postrouting priority srcnat;\n"
                    f'  oifname "wan" masquerade{random}\n }}\n}}\n'
                ),
            )
            # A home router's firewall: nothing from the internet reaches the router itself
            # except replies (a dropped packet leaves no conntrack entry behind).
            sh(
                "nsenter",
                f"--net=/run/netns/{router}",
                "nft",
                "-f",
                "-",
                stdin=(
                    "table inet home {\n chain input {\n"
                    "  type filter hook input priority filter; policy drop;\n"
                    "  ct state established,related accept\n"
                    '  iifname { "lo", "lan" } accept\n }\n}\n'
                ),
            )
            if i < 4:
                self.suppliers[i] = supplier
            else:
                self.user = supplier  # a user's machine behind its own NAT
        return self

    def router(self, i: int) -> str:
        """The namespace of home ``i``'s NAT router (4: the user's)."""
        return f"lt-{self.tag}-r{i}"

    def open_port(self, i: int, port: int, proto: str = "tcp") -> None:
        """Let the internet reach ``port`` on router ``i`` itself (a service on the router)."""
        rule = ["inet", "home", "input", proto, "dport", str(port), "accept"]
        sh("ip", "netns", "exec", self.router(i), "nft", "add", "rule", *rule)

    def host(self, i: int) -> str:
        """The namespace of home ``i``'s machine (1-3: suppliers, 4: the user's)."""
        return self.suppliers.get(i, self.user)

    def cut(self, i: int) -> None:
        """Cut home ``i`` off the internet: its router's uplink goes down, so packets to
        and from it vanish (nothing answers or resets a connection, as when a line dies)."""
        sh("ip", "-n", self.router(i), "link", "set", "wan", "down")

    def reconnect(self, i: int) -> None:
        sh("ip", "-n", self.router(i), "link", "set", "wan", "up")

    def destroy(self) -> None:
        for name in self.namespaces:
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", name, check=False)
        for link in self.links:
            sh("ip", "link", "del", link, check=False)
