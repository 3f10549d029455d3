"""An app served by uvicorn on a real socket, inside the test's event loop."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI


class LiveServer:
    """An app served by uvicorn on a free 127.0.0.1 port, in the running event loop."""

    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> LiveServer:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("the server stopped while starting")
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.server.should_exit = True
            await self.task
            self.task = None
        self.sock.close()
