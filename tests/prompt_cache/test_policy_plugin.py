"""A policy defined and registered here, outside the library, runs exactly through the exactness reference."""

import numpy as np
import pytest
import torch

from attention_store.policies import EncodingPolicy, get_policy, register, unregister
from prompt_cache.engine import PromptCache
from prompt_cache.tiny import tiny_model
from tests.prompt_cache.test_exactness import PROMPTS, SCHEMA, cached_fresh_logits, reference


def top(path):
    return path.split("/")[0] if path else ""


class Family(EncodingPolicy):
    """A module sees the leading root text and every earlier module under the same top-level module."""

    def visible(self, groups, modules):
        out = np.zeros((len(groups), len(groups)), dtype=bool)
        for qi, q in enumerate(groups):
            for ki, k in enumerate(groups):
                out[qi, ki] = q.unit == k.unit or k.leading or bool(q.unit and k.unit and top(q.unit) == top(k.unit))
        return out


def family_rule(layout, q_owner, q_pos, k_owner, k_pos, first_module):
    """The same policy written per token, as the reference takes it."""
    return (q_owner == k_owner or (k_owner == "" and k_pos < first_module)
            or bool(q_owner and k_owner and top(q_owner) == top(k_owner)))


@pytest.fixture
def family():
    register("test-family")(Family)
    yield "test-family"
    unregister("test-family")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_registered_policy_equals_its_reference(family, arch, prompt):
    pc = PromptCache(tiny_model(arch), policy=family)
    pc.add_schema(SCHEMA)
    got, s, bound = cached_fresh_logits(pc, PROMPTS[prompt])
    want = reference(pc.lm, s.layout, bound, None, rule=family_rule)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_the_test_policy_differs_from_the_builtins(family):
    # Otherwise the test above would prove nothing new: tokyo sees its parent `overseas` here only.
    pc = PromptCache(tiny_model("llama"), policy=family)
    pc.add_schema(SCHEMA)
    got, s, bound = cached_fresh_logits(pc, PROMPTS["tokyo"])
    for builtin in ("independent", "schema"):
        other = reference(pc.lm, s.layout, bound, builtin)
        assert (got - other).abs().max() > 1e-3


def test_registry_names_and_errors(family):
    assert get_policy(family).spec == "test-family"
    assert get_policy("independent:nosink").spec == "independent:nosink"
    with pytest.raises(ValueError, match="takes no argument"):
        get_policy("schema:3")
    with pytest.raises(ValueError, match="already registered"):
        register("independent")(Family)
