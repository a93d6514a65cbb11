"""slicer-core set-up shared by the Slicer-side tests (Slicer's application does these at start-up)."""
from __future__ import annotations

import slicer


def register_converter_rules() -> None:
    """Segmentations convert between labelmap and surface only once these rules are registered."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def read_volume_node(scene, path: str):
    """A scalar volume node read from `path` by Slicer's own reader (so geometry is Slicer's RAS)."""
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(path)
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return node


def editor_logic(scene, editor_node, segmentation_node, volume_node, segment_id: str):
    """Segment Editor logic over `editor_node` (added to the scene) editing `segment_id` of
    `segmentation_node` with `volume_node` as source, as the editor widget wires it."""
    scene.AddNode(editor_node)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor_node)
    editor_node.SetAndObserveSegmentationNode(segmentation_node)
    editor_node.SetAndObserveSourceVolumeNode(volume_node)
    editor_node.SetSelectedSegmentID(segment_id)
    return logic
