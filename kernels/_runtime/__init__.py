"""What every optimizer runs on: the base class and its step, flat-buffer layout, gradient gathering, state
import and export, DTensor shards, compilation, torch's private APIs (one module) and the C library's loader."""
