"""jaxinfer: a JAX/XLA functional inference stack for Llama-family LLMs."""

from jaxinfer.api import Model, load_model, random_model
from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.generate import GenerationOutput, StreamChunk, generate, generate_stream, score
from jaxinfer.page_allocator import PageAllocator, PagePoolExhausted
from jaxinfer.sampling import SamplingParams

__all__ = [
    "GenerationOutput",
    "Model",
    "ModelConfig",
    "PageAllocator",
    "PagePoolExhausted",
    "RopeScaling",
    "SamplingParams",
    "StreamChunk",
    "generate",
    "generate_stream",
    "load_model",
    "random_model",
    "score",
]
