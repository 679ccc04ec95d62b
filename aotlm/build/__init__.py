"""The build side: model.yaml -> traced, exported and compiled steps -> a bundle."""
