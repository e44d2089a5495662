//! DeviceProcessDeployment controller: one DeviceProcess per selected device
#![forbid(unsafe_code)]
