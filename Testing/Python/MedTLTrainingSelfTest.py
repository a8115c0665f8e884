"""CTest entry for the MedTL Training module's self-test (registered in Testing/CMakeLists.txt).

``slicer.testing.runUnitTest`` loads every TestCase in this file, so the module's own Test class is
imported inside the test method: imported at the top, it would be collected and run twice.
"""

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class MedTLTrainingSelfTest(ScriptedLoadableModuleTest):
    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def test_MedTLTraining(self) -> None:
        from MedTLTraining import MedTLTrainingTest

        MedTLTrainingTest().runTest()
