"""The tests' AMI peer (replaying ../shared/asterisk's real transcripts) on a fixed port,
for ``scripts/systemd-lab.sh``: it prints each action it receives, one line each (never
a ``Secret`` or ``Key`` header), and sends the recorded ``ContactStatus`` of phone 1001
each time the word ``contact`` is written to the command file.

Usage: python scripts/lab_peer.py PORT COMMAND_FILE
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.amipeer import FakeAsterisk

_HIDDEN = {"secret", "key"}


async def serve(port: int, commands: Path) -> None:
    """Serve until killed."""
    peer = FakeAsterisk()
    peer.port = port
    await peer.start()
    print("listening", peer.port, flush=True)
    seen = 0
    while True:
        await asyncio.sleep(0.05)
        for action in peer.received[seen:]:
            shown = " ".join(f"{k}={v}" for k, v in action.headers if k.lower() not in _HIDDEN)
            print("action", shown, flush=True)
        seen = len(peer.received)
        if commands.exists():
            command = commands.read_text().strip()
            commands.unlink()
            if command == "contact":
                await peer.send_recorded("Event: ContactStatus\r\n", "NonQualified")
                print("sent ContactStatus", flush=True)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2])))
