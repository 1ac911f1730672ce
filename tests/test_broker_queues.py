"""RenderQueue: queue names per model and priority in one place, the render message, and what a
worker sees waiting in Celery's Redis lists."""

from __future__ import annotations

import pytest
import redis

from broker import keys
from broker.celery_app import RENDER_QUEUE_ORDER, RENDER_QUEUES, render_job_id
from broker.queues import RenderQueue
from broker.schema import Priority


def test_the_default_queue_set_is_todays_and_a_model_gets_its_own() -> None:
    assert RenderQueue().order == ("render.high", "render.normal", "render.low") == RENDER_QUEUE_ORDER
    assert RenderQueue().names == RENDER_QUEUES
    edit = RenderQueue(model="qwen-image-edit")
    assert edit.order == ("render.qwen-image-edit.high", "render.qwen-image-edit.normal",
                          "render.qwen-image-edit.low")
    assert edit.name(Priority.LOW) == keys.render_queue("low", "qwen-image-edit")
    assert edit.name("bogus") == "render.qwen-image-edit.normal"  # as before: unknown → normal


def test_a_message_carries_only_the_job_id_on_its_priority_and_models_queue() -> None:
    queue, message = RenderQueue(model="qwen-image").message("job_0123", Priority.HIGH)
    assert queue == "render.qwen-image.high" and render_job_id(message) == "job_0123"
    assert '"routing_key": "render.qwen-image.high"' in message


def test_waiting_sees_only_untaken_messages_of_its_own_model(redis_client: redis.Redis) -> None:
    queues, other = RenderQueue(client=redis_client), RenderQueue(model="other", client=redis_client)
    assert not queues.waiting()
    redis_client.lpush(other.name("high"), "a message of another model")
    assert not queues.waiting() and queues.backlog(queues.order) == (0, 0) and other.waiting(["high"])
    redis_client.lpush(queues.name("normal"), "m")
    assert queues.waiting() and queues.waiting(["normal"]) and not queues.waiting(["high", "low"])
    assert queues.backlog([queues.name("high"), queues.name("normal")]) == (1, 0)
    assert queues.backlog([queues.name("high")]) == (0, 0) and not queues.waiting([])


def test_put_back_first_makes_the_job_the_next_one_taken(redis_client: redis.Redis) -> None:
    queues = RenderQueue(client=redis_client)
    redis_client.lpush(queues.name("low"), "an older message")
    queues.put_back_first("job_back", "low")
    assert render_job_id(redis_client.rpop(queues.name("low")) or b"") == "job_back"  # consumers pop the right


def test_without_a_client_or_celery_it_only_names_and_builds() -> None:
    with pytest.raises(RuntimeError):
        RenderQueue().waiting()
    with pytest.raises(RuntimeError):
        RenderQueue().enqueue("job_0123")
