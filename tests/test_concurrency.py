"""Many associations at once on one event loop."""

from __future__ import annotations

import asyncio

from minipacs.net.client import ClientAssociation
from minipacs.net.negotiation import UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION
from tests.dicom_tools import echoscu
from tests.servers import MinipacsProcess

CONTEXTS = [(VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES)]


async def _echo_association(port: int, index: int, hold: asyncio.Event) -> int:
    association = await ClientAssociation.connect(
        "127.0.0.1", port, calling_ae=f"SCU{index:03d}", called_ae="MINIPACS", contexts=CONTEXTS
    )
    status = await association.echo()
    await hold.wait()
    status |= await association.echo()
    await association.release()
    return status


def test_200_concurrent_associations_echo(server: MinipacsProcess) -> None:
    async def run() -> list[int]:
        hold = asyncio.Event()
        tasks = [asyncio.create_task(_echo_association(server.port, i, hold)) for i in range(200)]
        # All 200 are open at once before any releases; meanwhile another peer is served.
        while sum(1 for t in tasks if t.done()) == 0 and not hold.is_set():
            await asyncio.sleep(0.05)
            if server.log_text().count('"association.accepted"') >= 200:
                break
        assert await asyncio.to_thread(echoscu, server.port) == 0
        hold.set()
        return await asyncio.gather(*tasks)

    statuses = asyncio.run(asyncio.wait_for(run(), 90))
    assert statuses == [0] * 200
