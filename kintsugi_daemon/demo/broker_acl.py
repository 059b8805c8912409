"""Who may publish and subscribe what on a broker shared by several instruments: one identity per daemon,
operators granted instruments one by one.

- A daemon's MQTT user name *is* its instrument id. Mosquitto `pattern` rules with `%u` then confine every
  daemon to `kintsugi/v1/<its id>/...`: instrument A's daemon cannot publish B's retained status or read
  B's commands, and a new instrument needs a password entry, not an ACL edit.
- An operator writes `cmd/+` (and reads everything) only under the instruments granted to them; `+`
  grants every instrument (a facility-wide on-call operator).
- A monitor (Grafana, Node-RED, a phone) only reads, again per instrument or `+`.

Pattern rules apply to every user, so a person's user name must never equal an instrument id (they would
become that instrument's daemon): `Access` refuses such a policy, and user names that are not a single
topic level (Mosquitto ignores `%u` rules for names holding `+`, `#` or `/`, and so do we).

`python -m kintsugi_daemon.demo.broker_acl --operator alice=helios-1,helios-2 --monitor grafana=+` prints
the Mosquitto acl_file; `deploy/mosquitto/kintsugi.acl` is its output for the example there (a test keeps
the two equal).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["ALL", "DAEMON_WRITES", "Access", "acl_text", "amqtt_rules", "main"]

PREFIX = "kintsugi/v1"
ALL = "+"  # a grant of every instrument
# What a daemon publishes under its own root; it reads only its commands.
DAEMON_WRITES = (
    "status",
    "description",
    "progress",
    "events/#",
    "slices/#",
    "metrics",
    "alerts/#",
    "cmd/+/reply",
)
DAEMON_READS = ("cmd/+",)
# Home Assistant's discovery configs (optional, service/home_assistant.py) live under its own prefix, one
# device per instrument: `<prefix>/<component>/kintsugi_<instrument>/<key>/config` (default prefix).
HA_PREFIX = "homeassistant"
_LEVEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # the same single-level rule as service.messages.Topics


def _grants(value: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, ...]]:
    return {user: tuple(ids) for user, ids in value.items()}


@dataclass(frozen=True)
class Access:
    """The broker's users: `instruments` are daemon identities (user name = instrument id); `operators`
    and `monitors` map a user name to the instrument ids granted (`"+"`: all)."""

    instruments: tuple[str, ...] = ()
    operators: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    monitors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "operators", _grants(self.operators))
        object.__setattr__(self, "monitors", _grants(self.monitors))
        people = [*self.operators, *self.monitors]
        for name in [*self.instruments, *people]:
            if not _LEVEL.match(name):
                raise ValueError(f"broker user {name!r}: use letters, digits, '_', '.', '-' (1-64)")
        for kind, grants in (("operator", self.operators), ("monitor", self.monitors)):
            for user, ids in grants.items():
                if not ids:
                    raise ValueError(f"{kind} {user!r}: no instrument granted")
                for iid in ids:
                    if iid != ALL and not _LEVEL.match(iid):
                        raise ValueError(f"{kind} {user!r}: {iid!r} is not an instrument id or '+'")
        clash = sorted(set(self.instruments) & set(people))
        if clash:
            raise ValueError(
                f"broker user {clash[0]!r} is both an instrument and a person: pattern rules would make "
                "that person the instrument's daemon"
            )
        if len(set(people)) != len(people):
            raise ValueError("a broker user is both an operator and a monitor")

    @property
    def users(self) -> tuple[str, ...]:
        return (*self.instruments, *self.operators, *self.monitors)

    @classmethod
    def single_site(
        cls, instruments: Iterable[str], operator: str = "operator", monitor: str = "monitor"
    ) -> Access:
        """The demo's and tests' broker: these instruments, one operator and one monitor for all of them."""
        return cls(tuple(instruments), {operator: (ALL,)}, {monitor: (ALL,)})

    def writes(self, user: str) -> tuple[str, ...]:
        """Topic filters `user` may publish to, spelled out (no `%u`)."""
        if user in self.instruments:
            return (*(f"{PREFIX}/{user}/{t}" for t in DAEMON_WRITES), _ha_config(user))
        return tuple(f"{PREFIX}/{iid}/cmd/+" for iid in self.operators.get(user, ()))

    def reads(self, user: str) -> tuple[str, ...]:
        """Topic filters `user` may subscribe to, spelled out."""
        if user in self.instruments:
            return tuple(f"{PREFIX}/{user}/{t}" for t in DAEMON_READS)
        ids = self.operators.get(user) or self.monitors.get(user) or ()
        return (*(f"{PREFIX}/{iid}/#" for iid in ids), *(_ha_config(iid) for iid in ids))


def _ha_config(instrument: str) -> str:
    """The Home Assistant discovery configs of one instrument (`+`: of all of them; `%u`: a pattern)."""
    device = "+" if instrument == ALL else f"kintsugi_{instrument}"
    return f"{HA_PREFIX}/+/{device}/+/config"


def acl_text(access: Access) -> str:
    """A Mosquitto acl_file: `%u` patterns for every daemon, then one block per person."""
    lines = [
        "# Daemons: the MQTT user name is the instrument id; each writes only its own topic tree and",
        "# reads only its own commands.",
        *(f"pattern write {PREFIX}/%u/{t}" for t in DAEMON_WRITES),
        *(f"pattern read {PREFIX}/%u/{t}" for t in DAEMON_READS),
        "# Home Assistant discovery configs of its own device, when [home_assistant] discovery = true",
        f"pattern write {_ha_config('%u')}",
    ]
    for kind, grants in (("operator", access.operators), ("monitor", access.monitors)):
        for user in grants:
            lines += ["", f"# {kind}", f"user {user}"]
            lines += [f"topic write {t}" for t in access.writes(user)]
            lines += [f"topic read {t}" for t in access.reads(user)]
    return "\n".join(lines) + "\n"


def amqtt_rules(access: Access) -> dict[str, dict[str, list[str]]]:
    """The same policy for amqtt's TopicAccessControlListPlugin (no `%u` there: spelled out per user)."""
    return {
        "acl": {user: list(access.reads(user)) for user in access.users},
        "publish_acl": {user: list(access.writes(user)) for user in access.users},
    }


def _grant(text: str) -> tuple[str, tuple[str, ...]]:
    user, sep, ids = text.partition("=")
    if not sep or not ids:
        raise argparse.ArgumentTypeError(f"expected USER=ID[,ID...] or USER=+, got {text!r}")
    return user, tuple(i.strip() for i in ids.split(","))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kintsugi_daemon.demo.broker_acl", description="Print a Mosquitto acl_file."
    )
    p.add_argument("--operator", type=_grant, action="append", default=[], metavar="USER=ID,ID|+")
    p.add_argument("--monitor", type=_grant, action="append", default=[], metavar="USER=ID,ID|+")
    p.add_argument("--instrument", action="append", default=[], help="refuse people named like it")
    args = p.parse_args(argv)
    try:
        access = Access(tuple(args.instrument), dict(args.operator), dict(args.monitor))
    except ValueError as e:
        p.error(str(e))
    sys.stdout.write(acl_text(access))
    return 0


if __name__ == "__main__":
    sys.exit(main())
