"""Many hosts coordinated through etcd (opt-in: ``livemig daemon --fleet``).

``etcd.py`` the bounded JSON-gateway client; ``keys.py`` the key layout and
records; ``member.py`` a daemon's membership (host record under a lease) and
its ownership arbiter (the handover's commit point as an etcd transaction);
``view.py`` reading the fleet for ``livemig fleet hosts|vms``. See docs/fleet.md.
"""
