"""The toy VM: ISA, assembler, workload programs, devices, machine, snapshots."""
