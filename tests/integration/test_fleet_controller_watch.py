"""The candidates' watch on the leader key (fleet/controller.py, fleet/watch.py),
in-process against a real etcd: a candidate whose watch is up takes over when
the leader resigns, told by its watch; with its watch stream gone silent, the
safety poll still finds the key deleted. (A watch resumed from a revision
missing nothing: tests/unit/test_fleet_watch.py.)"""
from __future__ import annotations

import asyncio

import pytest

from livemig.fleet.controller import BalanceController
from livemig.fleet.member import FleetMember
from support.etcd import ETCD, ETCD_MISSING, etcd_cluster
from support.fleet import DaemonStub
from support.waiting import wait_for_async

pytestmark = pytest.mark.skipif(ETCD is None, reason=ETCD_MISSING)


async def _x_leads_y_watches(cx, cy) -> int:
    """x leads, y is a candidate with its watch up: x's term."""
    cx.start()
    await wait_for_async("x to lead", lambda: cx.term)
    cy.start()
    await wait_for_async("y's watch to be up", lambda: cy.watching)
    return cx.term


async def _pair(url):
    members = [FleetMember(DaemonStub(f"127.0.0.1:{i}"), url, ttl_s=60) for i in (1, 2)]
    for m in members:
        await m.join()
    controllers = [BalanceController(m, window_s=60, interval_s=3600) for m in members]
    return members, controllers


async def _close(members, controllers):
    for c in controllers:
        await c.close()
    for m in members:
        await m.close()


def _run(tmp_path, scenario):
    with etcd_cluster(tmp_path, members=1) as own:
        asyncio.run(scenario(own.url))


def test_a_watching_candidate_takes_over_when_the_leader_resigns(tmp_path):
    async def main(url):
        members, (cx, cy) = await _pair(url)
        try:
            term_x = await _x_leads_y_watches(cx, cy)
            await cx.close()                      # resigns: the key is deleted
            await wait_for_async("y to lead", lambda: cy.term > term_x)
            assert cy.watch_events >= 1           # the watch, not the safety poll, saw it
        finally:
            await _close(members, (cx, cy))
    _run(tmp_path, main)


def test_the_safety_poll_takes_over_when_the_watch_is_silent(tmp_path):
    async def main(url):
        members, (cx, cy) = await _pair(url)
        try:
            term_x = await _x_leads_y_watches(cx, cy)
            cy._watch_task.cancel()               # as a stream that stays open and silent
            await cx.close()
            await wait_for_async("y to lead", lambda: cy.term > term_x)
            assert cy.watch_events == 0
        finally:
            await _close(members, (cx, cy))
    _run(tmp_path, main)
