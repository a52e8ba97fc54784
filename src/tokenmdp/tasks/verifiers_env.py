"""verifiers environments (``verifiers`` 0.4, its ``verifiers.v1`` stack) as environment modules.

A verifiers environment is a ``vf.Env``: a taskset of ``vf.Task`` rows, an async ``run(task, agents)`` in which
the environment opens ``agents.<role>.interaction(task)`` and alternates ``await chat.turn(reply)`` with its own
logic, and ``@vf.reward`` methods on the task, weighted, scored on the finished trace. verifiers sends the model's
turns to an OpenAI-style server; here the policy answers them instead. :class:`VerifiersEpisodes` gives the
environment OpenEnv's synchronous shape (:mod:`tokenmdp.tasks.env_module`): ``reset(seed)`` starts ``run`` on
task ``seed`` and returns the first request's messages as text, ``step(text)`` hands the policy's turn to the
waiting ``chat.turn`` and returns what the environment says next, or the trace's reward and its weighted parts
once the episode is over. Each turn goes into a real ``vf.Trace`` through verifiers' own turn code, and the task
scores it with its own rewards.

What this does not run: tools (MCP toolsets), ``@vf.intercept`` hooks, harness metrics, and rewards that need a
sandbox runtime (verifiers skips those when no runtime is given). The code reads parts of ``verifiers.v1`` outside
its ``__all__``, so the ``envs`` extra pins verifiers 0.4.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

from tokenmdp.errors import TokenMDPError


def _v1():
    """verifiers' v1 stack and the parts of it the driver uses, imported on first use: only a verifiers environment
    needs them, and they take seconds to import."""
    import verifiers.v1 as vf
    from verifiers.v1.configs.agent import agent_config_fields
    from verifiers.v1.dialects.chat import parse_message
    from verifiers.v1.graph import prepare_turn
    from verifiers.v1.session import RolloutLimits, call_hook, hook_boundary
    from verifiers.v1.state import state_cls

    return SimpleNamespace(vf=vf, agent_config_fields=agent_config_fields, parse_message=parse_message,
                           prepare_turn=prepare_turn, RolloutLimits=RolloutLimits, call_hook=call_hook,
                           hook_boundary=hook_boundary, state_cls=state_cls)


def is_verifiers_env(obj: Any) -> bool:
    return type(obj).__module__.startswith("verifiers.") or any(
        c.__module__.startswith("verifiers.v1") and c.__name__ == "Env" for c in type(obj).__mro__)


def _text(messages: list) -> str:
    """Messages as the plain text the policy reads: their contents, one after the other."""
    return "\n".join(str(getattr(m, "content", None) or "") for m in messages if getattr(m, "content", None))


class _Chat:
    """One agent's exchange in an episode: ``turn`` waits for the policy's answer (see the module docstring)."""

    def __init__(self, episodes: VerifiersEpisodes, task, config, name: str):
        v = _v1()
        vf = v.vf
        self.episodes, self.task = episodes, task
        self.trace = vf.Trace(task=vf.TraceTask(type=type(task).__name__, data=task.data, key=task.key,
                                                hash=task.hash),
                              agent=vf.AgentInfo(config=config, name=name, trainable=True),
                              state=v.state_cls(type(task))())
        self.limits = v.RolloutLimits(max_turns=config.max_turns)
        self.stops = [fn for fn in task.hooks("stop") if v.hook_boundary(fn, allow_trace=True) is vf.Trace]
        self.conversation: list = []
        self.over = self.closed = False

    async def _refused(self) -> str | None:
        """Why no further turn is allowed (the agent's turn limit, a task's ``@vf.stop``), or None."""
        v = _v1()
        limit = self.limits.reached(self.trace)
        if limit is not None:
            return limit
        for stop in self.stops:
            if await v.call_hook(stop, {v.vf.Trace: self.trace}):
                return stop.__name__
        return None

    async def turn(self, message=None):
        v = _v1()
        vf = v.vf
        if self.over:
            raise TokenMDPError(f"verifiers environment {self.episodes.name}: a turn after the exchange ended")
        if message is None:  # the task's prompt opens the exchange
            data = self.task.data
            new = [vf.SystemMessage(content=data.system_prompt)] if data.system_prompt else []
            new += [vf.UserMessage(content=data.prompt)] if isinstance(data.prompt, str) else list(data.prompt or [])
            conversation = new
        else:
            new = [vf.UserMessage(content=message)] if isinstance(message, str) else [
                v.parse_message(m) if isinstance(m, dict) else m for m in message]
            conversation = [*self.conversation, *new]
        stopped = await self._refused()
        if stopped is not None:
            v.prepare_turn(self.trace, conversation).commit_prompt()
            self.trace.stop(stopped)
            self.over = True
            return vf.Segment(messages=[], terminated=True)
        answer = await self.episodes.ask(_text(new))
        reply = vf.AssistantMessage(content=answer)
        v.prepare_turn(self.trace, conversation).commit(vf.Response(
            id=uuid.uuid4().hex, created=int(time.time()), model="tokenmdp-policy", message=reply,
            finish_reason="stop"))
        self.conversation = [*conversation, reply]
        return vf.Segment(messages=[reply])

    async def close(self):
        if not self.closed:
            self.closed = True
            self.trace.stop("user_closed")
            await self.task.score(self.trace)  # the task's @vf.reward and @vf.metric functions
            self.trace.is_completed = self.trace.ok = True
            self.episodes.traces.append(self.trace)
        return self.trace


class _Agent:
    def __init__(self, episodes: VerifiersEpisodes, name: str, config):
        self.episodes, self.name, self.config, self.trainable = episodes, name, config, True

    @asynccontextmanager
    async def interaction(self, task, **_):
        chat = _Chat(self.episodes, task, self.config, self.name)
        try:
            yield chat
        finally:
            await chat.close()

    async def run(self, task, **_):
        """A single segment, as verifiers' ``Agent.run``: one turn, then the trace is scored."""
        async with self.interaction(task) as chat:
            await chat.turn()
            chat.trace.stop("agent_completed")
        return chat.trace


class _Agents:
    def __init__(self, episodes: VerifiersEpisodes, env):
        self._agents = {n: _Agent(episodes, n, c) for n, c in _v1().agent_config_fields(env.config).items()}

    def __getattr__(self, name):
        try:
            return self.__dict__["_agents"][name]
        except KeyError:
            raise AttributeError(name) from None


class VerifiersEpisodes:
    """A ``vf.Env`` with OpenEnv's ``reset(seed)`` / ``step(text)`` (one episode at a time); ``num_episodes``: its
    taskset's rows (episode ``seed`` is row ``seed``)."""

    def __init__(self, env, name: str = "verifiers"):
        self.env, self.name = env, name
        self.tasks = list(env.taskset)
        if not self.tasks:
            raise TokenMDPError(f"verifiers environment {name}: its taskset is empty")
        self.num_episodes = len(self.tasks)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.traces: list = []

    async def ask(self, text: str) -> str:
        """Called by a ``turn``: hand ``text`` out and wait for the policy's answer."""
        self.answer = self.loop.create_future()
        self.request.set_result(text)
        return await self.answer

    async def _run(self, task) -> None:
        agents = _Agents(self, self.env)
        await self.env.setup(agents)
        await self.env.run(task, agents)

    async def _next(self) -> str | None:
        """The environment's next request to the policy (``self.request``, made before the run resumed), or None when
        its ``run`` has returned."""
        done, _ = await asyncio.wait({self.request, self.runner}, return_when=asyncio.FIRST_COMPLETED)
        if self.request in done:
            return self.request.result()
        self.runner.result()  # an error of the environment's run is raised here
        return None

    def reset(self, seed: int | None = None, **_) -> dict:
        if seed is None or not 0 <= seed < self.num_episodes:
            raise TokenMDPError(f"verifiers environment {self.name}: episode {seed} of {self.num_episodes} rows")
        self.close()
        self.loop, self.traces = asyncio.new_event_loop(), []
        self.request = self.loop.create_future()
        self.runner = self.loop.create_task(self._run(self.tasks[seed]))
        text = self.loop.run_until_complete(self._next())
        if text is None:
            raise TokenMDPError(f"verifiers environment {self.name}: episode {seed} ended before the first turn")
        return {"text": text, "reward": None, "done": False}

    def step(self, action: str) -> dict:
        if self.loop is None:
            raise TokenMDPError(f"verifiers environment {self.name}: step() before reset()")
        self.request = self.loop.create_future()
        self.answer.set_result(action)
        text = self.loop.run_until_complete(self._next())
        if text is not None:
            return {"text": text, "reward": 0.0, "done": False}
        return self._result()

    def finish(self) -> dict:
        """End the episode before the environment does (the policy wrote EOS): its run is cancelled where it waits
        for a turn, which closes the exchange, so the task still scores the turns it has."""
        if self.loop is not None and not self.runner.done():
            self.runner.cancel()
            self.loop.run_until_complete(asyncio.gather(self.runner, return_exceptions=True))
        return self._result()

    def _result(self) -> dict:
        """The episode's reward (its trainable traces') and weighted parts; the episode is closed."""
        traces = [t for t in self.traces if t.agent.trainable]
        reward = float(sum(t.reward or 0.0 for t in traces))
        parts: dict[str, float] = {}
        for trace in traces:
            for key, r in trace.rewards.items():
                if r is not None:
                    parts[key] = parts.get(key, 0.0) + float(r.score) * float(r.weight)
        self.close()
        return {"text": "", "reward": reward, "done": True, "parts": parts}

    def close(self) -> None:
        """End the current episode (its run cancelled if it still waits for a turn) and its event loop."""
        if self.loop is not None:
            if not self.runner.done():
                self.runner.cancel()
                self.loop.run_until_complete(asyncio.gather(self.runner, return_exceptions=True))
            self.loop.close()
            self.loop = None

    def __del__(self) -> None:  # an episode cut short by a limit is never finished: end its run quietly
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown: nothing left to do)
            pass


__all__ = ["VerifiersEpisodes", "is_verifiers_env"]
