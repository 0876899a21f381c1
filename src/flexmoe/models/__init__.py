"""Model layer: load a base MoE, find its MoE blocks, select and graft experts (FLEx), add LoRA,
and split / save / load the shared and personal parts."""

from flexmoe.models.families import FAMILIES, Family, MoELayer, family_of, moe_layers, unwrap
from flexmoe.models.graft import (
    GATES,
    ExpertGraft,
    ExpertMLP,
    GraftTraining,
    current_selection,
    extract_expert,
    graft,
    grafts,
    grafts_disabled,
    ungraft,
)
from flexmoe.models.load import load_base, resolve_model_dir, tiny_path
from flexmoe.models.selection import STRATEGIES, Selection, select_experts
from flexmoe.models.lora import SCOPES, add_lora, check_lora_placement, lora_module_names
from flexmoe.models.roles import PARTS, ModelSplit, Roles, apply_roles, set_shared_state, shared_state, split_parameters
from flexmoe.models.graft_file import (
    base_fingerprint,
    load_graft,
    graft_state,
    read_graft,
    save_graft,
    set_graft_state,
)

__all__ = [
    "FAMILIES", "GATES", "SCOPES", "STRATEGIES",
    "ExpertGraft", "ExpertMLP", "Family", "GraftTraining", "ModelSplit", "MoELayer", "PARTS", "Roles", "Selection",
    "add_lora", "apply_roles", "base_fingerprint", "check_lora_placement", "current_selection", "extract_expert",
    "family_of", "graft", "grafts", "grafts_disabled", "load_base", "load_graft", "lora_module_names",
    "moe_layers", "graft_state", "read_graft", "resolve_model_dir", "save_graft",
    "select_experts", "set_graft_state", "set_shared_state", "shared_state",
    "split_parameters", "tiny_path", "ungraft", "unwrap",
]
