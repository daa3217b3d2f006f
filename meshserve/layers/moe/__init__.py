"""Mixture-of-experts layers: router (which experts a token goes to), dispatch (how tokens reach the
ranks holding those experts and come back), experts (the expert FFNs, one class per
`moe_config.backend`), and `FusedMoE`, the layer model files use. See docs/moe.md."""
