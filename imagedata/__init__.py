"""imagedata: image loading, revisitop data + evaluation, training sets, augmentations, the shared
folder -> feature-file extraction loop and training utilities.

Modules (import them directly, e.g. ``from imagedata.images import load_image``; this package
imports nothing eagerly so the numpy-only ``revisitop`` stays usable without torch):
  images      load_image / ImageLoadError / list_images / image_to_tensor / resize_max_side /
              crop_to_box / image_pyramid
  revisitop   load_revisitop / compute_map / evaluate_revisitop / ukbench_ns_score (numpy only)
  datasets    LabelledImageList sources (revisitop, GLDv2 csv, folder), ClassificationImages,
              ImagePairs, hardest_negatives
  augment     AugmentConfig / build_augmentation / TwoViews (kornia)
  extraction  extract_to_file -> ExtractionReport (images -> asmk_index feature file)
  training    TrainState, save_checkpoint / load_checkpoint, seed_everything, setup_distributed,
              wrap_ddp, make_sampler, is_main_process
"""
