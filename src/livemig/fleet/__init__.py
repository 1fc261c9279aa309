"""Many hosts coordinated through etcd (opt-in: ``livemig daemon --fleet``).

``etcd.py`` the bounded JSON-gateway client; ``keys.py`` the key layout and
records; ``member.py`` a daemon's membership (host record under a lease) and
its ownership arbiter (the handover's commit point as an etcd transaction);
``view.py`` the fleet as ``livemig fleet hosts|vms`` shows it; ``planner.py``
drain and balance plans (pure); ``drain.py`` a drain run by the host from its
etcd mark (and a balance's moves); ``balance.py`` a balance run; ``place.py``
``vm start --fleet``; ``resolve.py`` ``vm resolve`` decided by etcd;
``simulate.py`` a generated fleet for the planner. See docs/fleet.md.
"""
