"""Structured output on the host: grammars compiled once per spec, one matcher per sequence, and
the packed token bitmask (int32 words, bit t of word t // 32 set = token t allowed) that a sampler
takes as data. The engine is llguidance (no dependencies; xgrammar 0.2.8 imports torch)."""
