"""The real-time DETR room: deformable attention, decoder layers, denoising queries, query
selection and D-FINE's fine-grained distribution refinement, shared by the DETR heads."""

from .attention import MSDeformableAttention, deformable_sampling
from .decoder import MLP, DecoderLayer, Gate, RTDETRDecoder, SelfAttention
from .denoising import DenoisingQueries, contrastive_denoising_queries, denoising_attention_mask
from .fdr import FDRDecoder, LocationQuality, distance_to_box, distribution_integral, weighting_function
from .outputs import assemble_outputs, detr_targets_from_detkit, topk_predictions
from .position import inverse_sigmoid, sine_position_embedding_2d
from .query_selection import LevelProjection, QuerySelection, flatten_levels, make_anchors

__all__ = ["MSDeformableAttention", "deformable_sampling", "MLP", "DecoderLayer", "Gate", "RTDETRDecoder",
           "SelfAttention", "DenoisingQueries", "contrastive_denoising_queries", "denoising_attention_mask",
           "FDRDecoder", "LocationQuality", "distance_to_box", "distribution_integral", "weighting_function",
           "assemble_outputs", "detr_targets_from_detkit", "topk_predictions", "inverse_sigmoid",
           "sine_position_embedding_2d", "LevelProjection", "QuerySelection", "flatten_levels",
           "make_anchors"]
