"""The exception types for bad user input.

``InputError`` is a ``ValueError`` so library callers can catch either; the CLI turns it (and
``FileNotFoundError``) into a one-line ``error: ...`` message and exit code 2. Messages name the input and
what was expected. Subclasses name a kind a caller may want to tell apart (``PromptTooLong``: the eval runner
records it as a failed row). This module does nothing else.
"""


class InputError(ValueError):
    """Bad input from the user: a missing file, an unknown name, a wrong shape, a corrupt image, ..."""


class PromptTooLong(InputError):
    """The prompt's tokens plus the new tokens asked for exceed the model's positions
    (``max_position_embeddings``): generating past them gives garbage, so nothing is generated.

    ``prompt_tokens``, ``max_new_tokens`` and ``max_positions`` hold the numbers (ints); the message names them.
    """

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_positions: int):
        self.prompt_tokens, self.max_new_tokens, self.max_positions = prompt_tokens, max_new_tokens, max_positions
        super().__init__(f"prompt: {prompt_tokens} tokens + {max_new_tokens} new tokens = "
                         f"{prompt_tokens + max_new_tokens}, more than the model's {max_positions} positions "
                         "(max_position_embeddings); shorten the prompt or lower --max-new-tokens")

    def __reduce__(self):  # picklable (sweep workers send exceptions across processes)
        return (type(self), (self.prompt_tokens, self.max_new_tokens, self.max_positions))
