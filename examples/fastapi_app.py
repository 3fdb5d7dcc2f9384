"""Worked example: an asyncio order service (FastAPI) that arms each new order's expiry
timer and disarms it when the order is paid, through delayq.aio (nothing blocks the loop).

    export DELAYQ_REDIS_URL=redis://localhost:6379/1     # the Redis `delayq listen` uses
    uvicorn examples.fastapi_app:app
    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"order_sn": "SN-1001"}'                    # unpaid in 30 min: cancelled
    curl -X POST localhost:8000/orders/SN-1001/pay       # paid: the timer is disarmed

The orders themselves live in your database; this app only shows delayq's two calls, the
pool closed at shutdown (the lifespan), and delayq's errors as HTTP answers: bad input is
422, Redis down or refusing is 503, each with delayq's one-line message. With your own
AsyncSession, pass `connection=session` to stage the timer in the order's transaction
instead (docs/asyncio.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from delayq import aio
from delayq.errors import DelayqError, InvalidInput

#: How long an order may stay unpaid.
PAYMENT_WINDOW = "30m"


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    await aio.aclose()  # the default producer's connections, made on first use


app = FastAPI(title="orders", lifespan=lifespan)


class NewOrder(BaseModel):
    order_sn: str


class Placed(BaseModel):
    order_sn: str
    expires_at: datetime


class Paid(BaseModel):
    order_sn: str
    #: False: nothing was pending (already fired, or never armed) or it is firing now; the
    #: listener re-checks the order's status, so a paid order is never cancelled anyway.
    disarmed: bool


@app.exception_handler(DelayqError)
async def delayq_error(_request: Request, exc: DelayqError) -> JSONResponse:
    status = 422 if isinstance(exc, InvalidInput) else 503
    return JSONResponse({"detail": str(exc)}, status_code=status)


@app.post("/orders", status_code=201)
async def place_order(order: NewOrder) -> Placed:
    # ... INSERT the order (status unpaid) in your database first ...
    expires_at = await aio.schedule_expiry(order.order_sn, PAYMENT_WINDOW)
    return Placed(order_sn=order.order_sn, expires_at=expires_at)


@app.post("/orders/{order_sn}/pay")
async def pay_order(order_sn: str) -> Paid:
    # ... UPDATE the order to paid in your database first ...
    return Paid(order_sn=order_sn, disarmed=await aio.cancel_expiry(order_sn))
