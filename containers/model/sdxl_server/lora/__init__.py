"""LoRA adapters chosen per request (issue 16): safe to expose, cached, and without recompiling.

LoRA is off unless the operator sets SDXL_LORA_SOURCES (the gs:// and hf:// prefixes requests may name) or
SDXL_LORAS (named adapters preloaded at start). When on, the server adds one zero LoRA adapter, the "slot", to
the UNet and both text encoders before optimizing and compiling, at rank SDXL_LORA_MAX_RANK, on fixed targets
(attention, feed-forward and projection layers: kohya's default). A request's adapters (at most 3, each with a
scale) are combined into that slot and copied into its existing parameters in place, so compiled code stays
valid and nothing recompiles; a request without adapters zeroes the slot (the base's output, bit for bit).
A source is parsed to a canonical URI before the allow-list sees it (sources.py); files are fetched into a
disk cache with a byte budget (store.py), read with the safetensors library only and checked against SDXL's
modules (adapters.py), swapped into the slot (slots.py), and all of it is driven per request (service.py).
"""
