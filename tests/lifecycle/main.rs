//! check / enable / disable / status on a root tree of real files (fstab, grub defaults, /boot,
//! lib/modules, stub update-initramfs/dracut/update-grub scripts that write real cpio images and a
//! real grub.cfg) and a described machine (block devices cannot be faked on a build host).
//!
//! Every "bad input" case compares a digest of the whole tree before and after.

mod fake;
mod tests_check;
mod tests_enable;
mod tests_status;
